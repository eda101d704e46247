CREATE OR REPLACE FUNCTION tokens_history() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $fn$
-- AFTER UPDATE ON accounts, each row whose tokens_reserved or tokens_spent changed, whichever
-- path changed it: what they became, at the change's time (every writer stamps updated_at with
-- it), so a balance can be read as of any instant (tokens_balance_at).
BEGIN
    INSERT INTO account_history (user_id, at, reserved, spent)
    VALUES (NEW.user_id, NEW.updated_at, NEW.tokens_reserved, NEW.tokens_spent);
    RETURN NULL;
END
$fn$;
