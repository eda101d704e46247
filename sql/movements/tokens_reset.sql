CREATE OR REPLACE FUNCTION tokens_reset(
    p_user text, p_key text, p_digest text, p_op text, p_new_balance bigint, p_priority integer,
    p_metadata jsonb,
    OUT status text, OUT entry_id bigint, OUT balance bigint, OUT reserved bigint,
    OUT spent bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[], OUT pool text
) LANGUAGE plpgsql VOLATILE AS $fn$
-- status: 'ok', 'replay', 'conflict', 'not_found', 'member' (with pool) or
-- 'below_reserved'. Upwards the difference
-- is an adjustment grant (of p_priority) that pays the debt first; downwards it is spent in
-- burn order, never into debt (p_new_balance >= reserved leaves the free tokens enough).
DECLARE
    v_debt bigint;
    v_now timestamptz;
    v_delta bigint;
    v_debt_delta bigint := 0;
    v_gids bigint[] := '{}';
    v_amounts bigint[] := '{}';
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
    IF p_new_balance < reserved THEN
        status := 'below_reserved';
        RETURN;
    END IF;
    v_delta := p_new_balance - balance;
    IF v_delta > 0 THEN
        SELECT * INTO g FROM tokens_grant(
            p_user, 'adjustment', v_delta, p_priority, NULL, v_debt, v_now);
        v_gids := ARRAY[g.grant_id];
        v_amounts := ARRAY[g.kept];
        v_debt_delta := g.kept - v_delta;
    ELSIF v_delta < 0 THEN
        SELECT * INTO g FROM tokens_burn(p_user, -v_delta, v_now);
        IF g.uncovered > 0 THEN
            RAISE EXCEPTION 'spend beyond the free tokens without into_debt';
        END IF;
        v_gids := g.gids;
        v_amounts := g.amounts;
    END IF;
    SELECT w.entry_id, w.balance, w.reserved, w.spent, w.response
    INTO entry_id, balance, reserved, spent, response
    FROM tokens_write(p_user, 'adjustment', p_op, v_delta, v_debt_delta, 0, p_key,
                      p_metadata, v_now, v_gids, v_amounts) w;
    status := 'ok';
END
$fn$;
