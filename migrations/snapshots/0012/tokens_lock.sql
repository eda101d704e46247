CREATE OR REPLACE FUNCTION tokens_lock(
    p_user text,
    OUT balance bigint, OUT reserved bigint, OUT spent bigint, OUT debt bigint,
    OUT moment timestamptz, OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
-- The account lock, then the movement's time, read once the lock is held (moment NULL: no such
-- account); then the due grants' expiry by (expires_at, id), one expiry entry each.
#variable_conflict use_column
DECLARE
    g record;
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
    FOR g IN
        SELECT gr.id, gr.remaining - gr.held AS free
        FROM grants gr
        WHERE gr.user_id = p_user AND gr.status = 'active' AND gr.remaining > gr.held
          AND gr.expires_at IS NOT NULL AND gr.expires_at <= moment
        ORDER BY gr.expires_at, gr.id
    LOOP
        balance := tokens_expire_grant(p_user, g.id, g.free, moment);
        expired_tokens := expired_tokens || g.free;
        expired_balances := expired_balances || balance;
    END LOOP;
END
$fn$;
