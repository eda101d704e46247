CREATE OR REPLACE FUNCTION tokens_spend(
    p_user text, p_key text, p_digest text, p_kind text, p_op text, p_amount bigint,
    p_overdraft boolean, p_metadata jsonb,
    OUT status text, OUT available bigint, OUT entry_id bigint, OUT balance bigint,
    OUT reserved bigint, OUT spent bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[], OUT pool text,
    OUT refused jsonb
) LANGUAGE plpgsql VOLATILE AS $fn$
-- status: 'ok', 'replay', 'conflict', 'not_found', 'insufficient' (with available) or 'limit'
-- (refused: the limit, tokens_limit). A member (p_user) spends its pool's grants.
DECLARE
    v_now timestamptz;
    v_limited boolean;
    b record;
BEGIN
    expired_tokens := '{}';
    expired_balances := '{}';
    SELECT c.status, c.response INTO status, response FROM tokens_claim(p_user, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT l.balance, l.reserved, l.spent, l.moment, l.expired_tokens, l.expired_balances,
           l.pool, l.limited
    INTO balance, reserved, spent, v_now, expired_tokens, expired_balances, pool, v_limited
    FROM tokens_lock(p_user) l;
    IF v_now IS NULL THEN
        status := 'not_found';
        RETURN;
    END IF;
    available := balance - reserved;
    IF NOT p_overdraft AND available < p_amount THEN
        status := 'insufficient';
        RETURN;
    END IF;
    refused := tokens_limit(pool, p_user, v_limited, p_amount, v_now, 0, v_now, true);
    IF refused IS NOT NULL THEN
        status := 'limit';
        RETURN;
    END IF;
    -- Burn-down in burn order; what no grant covers becomes debt.
    SELECT * INTO b FROM tokens_burn(pool, p_amount, v_now);
    SELECT w.entry_id, w.balance, w.reserved, w.spent, w.response
    INTO entry_id, balance, reserved, spent, response
    FROM tokens_write(pool, p_kind, p_op, -p_amount, b.uncovered, p_amount, p_key,
                      p_metadata, v_now, b.gids, b.amounts,
                      p_spent_by => nullif(p_user, pool)) w;
    status := 'ok';
END
$fn$;
