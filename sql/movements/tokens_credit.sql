CREATE OR REPLACE FUNCTION tokens_credit(
    p_user text, p_key text, p_digest text, p_op text, p_grant_kind text, p_amount bigint,
    p_priority integer, p_expires_at timestamptz, p_metadata jsonb,
    OUT status text, OUT entry_id bigint, OUT balance bigint, OUT reserved bigint,
    OUT spent bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[], OUT pool text
) LANGUAGE plpgsql VOLATILE AS $fn$
-- status: 'ok', 'replay', 'conflict', 'not_found', 'member' (with pool) or
-- 'expires_past'.
DECLARE
    v_debt bigint;
    v_now timestamptz;
    g record;
BEGIN
    SELECT c.status, c.response INTO status, response FROM tokens_claim(p_user, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT l.balance, l.reserved, l.spent, l.debt, l.moment, l.expired_tokens,
           l.expired_balances, l.pool
    INTO balance, reserved, spent, v_debt, v_now, expired_tokens, expired_balances, pool
    FROM tokens_lock(p_user) l;
    IF v_now IS NULL THEN
        status := 'not_found';
        RETURN;
    END IF;
    -- Tokens enter a pool's tree through the pool.
    IF pool <> p_user THEN
        status := 'member';
        RETURN;
    END IF;
    IF p_expires_at <= v_now THEN
        status := 'expires_past';
        RETURN;
    END IF;
    SELECT * INTO g FROM tokens_grant(
        p_user, p_grant_kind, p_amount, p_priority, p_expires_at, v_debt, v_now);
    SELECT w.entry_id, w.balance, w.reserved, w.spent, w.response
    INTO entry_id, balance, reserved, spent, response
    FROM tokens_write(p_user, 'credit', p_op, p_amount, g.kept - p_amount, 0, p_key,
                      p_metadata, v_now, ARRAY[g.grant_id], ARRAY[g.kept]) w;
    status := 'ok';
END
$fn$;
