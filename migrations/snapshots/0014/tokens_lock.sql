CREATE OR REPLACE FUNCTION tokens_lock(
    p_user text,
    OUT balance bigint, OUT reserved bigint, OUT spent bigint, OUT debt bigint,
    OUT moment timestamptz, OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
-- The account lock, then the movement's time, read once the lock is held (moment NULL: no such
-- account); then the due grants' expiry (tokens_expire_due).
#variable_conflict use_column
BEGIN
    expired_tokens := '{}';
    expired_balances := '{}';
    SELECT l.tokens_balance, l.tokens_reserved, l.tokens_spent, l.debt,
           greatest(clock_timestamp(), l.updated_at)
    INTO balance, reserved, spent, debt, moment
    FROM (SELECT a.tokens_balance, a.tokens_reserved, a.tokens_spent, a.debt, a.updated_at
          FROM accounts a WHERE a.user_id = p_user FOR UPDATE) l;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT e.tokens, e.balances INTO expired_tokens, expired_balances
    FROM tokens_expire_due(p_user, moment) e;
    IF cardinality(expired_balances) > 0 THEN
        balance := expired_balances[cardinality(expired_balances)];
    END IF;
END
$fn$;
