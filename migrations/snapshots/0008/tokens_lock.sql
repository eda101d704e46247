CREATE OR REPLACE FUNCTION tokens_lock(
    p_user text,
    OUT balance bigint, OUT reserved bigint, OUT spent bigint, OUT debt bigint,
    OUT moment timestamptz, OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
-- The account lock and the movement's time (moment NULL: no such account), then the due
-- grants' expiry by (expires_at, id), one expiry entry each (tokens_expire_grant, 0007).
#variable_conflict use_column
DECLARE
    g record;
BEGIN
    expired_tokens := '{}';
    expired_balances := '{}';
    SELECT a.tokens_balance, a.tokens_reserved, a.tokens_spent, a.debt,
           greatest(clock_timestamp(), a.updated_at)
    INTO balance, reserved, spent, debt, moment
    FROM accounts a WHERE a.user_id = p_user FOR UPDATE;
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
