CREATE OR REPLACE FUNCTION tokens_alerts_due() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $fn$
-- AFTER UPDATE OF tokens_balance, tokens_reserved ON accounts, deferred to the commit, for an
-- account with alerts or an auto top-up (accounts.watched): the transaction's crossings, once.
BEGIN
    PERFORM tokens_alerts(NEW.user_id);
    RETURN NULL;
END
$fn$;
