CREATE OR REPLACE FUNCTION tokens_reserve(
    p_user text, p_key text, p_digest text, p_id text, p_amount bigint, p_op text,
    p_ttl integer, p_metadata jsonb, p_overcapture bigint,
    OUT status text, OUT available bigint, OUT balance bigint, OUT reserved bigint,
    OUT response jsonb, OUT expired_tokens bigint[], OUT expired_balances bigint[],
    OUT pool text, OUT refused jsonb
) LANGUAGE plpgsql VOLATILE AS $fn$
-- status: 'ok', 'replay', 'conflict', 'not_found', 'insufficient' (with available) or 'limit'
-- (refused: the limit, tokens_limit). A member (p_user) holds its pool's grants: the
-- reservation is the pool's (user_id), made by the member (spent_by).
#variable_conflict use_column
DECLARE
    v_now timestamptz;
    v_limited boolean;
    v_expires timestamptz;
BEGIN
    SELECT c.status, c.response INTO status, response
    FROM tokens_claim(p_user, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;

    -- The account lock (grants.lock) and the movement's time, then the due grants' expiry
    -- (tokens_lock, 0008); balance and reserved are the account's as the guard sees it.
    SELECT l.balance, l.reserved, l.moment, l.expired_tokens, l.expired_balances, l.pool,
           l.limited
    INTO balance, reserved, v_now, expired_tokens, expired_balances, pool, v_limited
    FROM tokens_lock(p_user) l;
    IF v_now IS NULL THEN
        status := 'not_found';
        RETURN;
    END IF;

    available := balance - reserved;
    IF available < p_amount THEN
        status := 'insufficient';
        RETURN;
    END IF;
    refused := tokens_limit(pool, p_user, v_limited, 0, v_now, p_amount, v_now, true);
    IF refused IS NOT NULL THEN
        status := 'limit';
        RETURN;
    END IF;

    v_expires := v_now + make_interval(secs => p_ttl);
    INSERT INTO reservations (id, user_id, amount, operation_type, status, expires_at, created_at,
                              metadata, overcapture_limit, spent_by)
    VALUES (p_id, pool, p_amount, p_op, 'active', v_expires, v_now, p_metadata, p_overcapture,
            nullif(p_user, pool));

    PERFORM tokens_hold(pool, p_id, p_amount, v_now);

    response := jsonb_build_object(
        'success', true, 'reservation_id', p_id, 'amount', p_amount,
        'expires_at', tokens_iso(v_expires), 'tokens_available', available - p_amount,
        'replayed', false);
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records r SET response = tokens_reserve.response
        WHERE r.user_id = p_user AND r.key = p_key;
    END IF;
    status := 'ok';
END
$fn$;
