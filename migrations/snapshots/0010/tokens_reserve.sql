CREATE OR REPLACE FUNCTION tokens_reserve(
    p_user text, p_key text, p_digest text, p_id text, p_amount bigint, p_op text,
    p_ttl integer, p_metadata jsonb, p_overcapture bigint,
    OUT status text, OUT available bigint, OUT balance bigint, OUT reserved bigint,
    OUT response jsonb, OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    v_now timestamptz;
    v_expires timestamptz;
    v_left bigint;
    v_take bigint;
    g record;
BEGIN
    SELECT c.status, c.response INTO status, response
    FROM tokens_claim(p_user, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;

    -- The account lock (grants.lock) and the movement's time, then the due grants' expiry
    -- (tokens_lock, 0008); balance and reserved are the account's as the guard sees it.
    SELECT l.balance, l.reserved, l.moment, l.expired_tokens, l.expired_balances
    INTO balance, reserved, v_now, expired_tokens, expired_balances
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

    v_expires := v_now + make_interval(secs => p_ttl);
    INSERT INTO reservations (id, user_id, amount, operation_type, status, expires_at, created_at,
                              metadata, overcapture_limit)
    VALUES (p_id, p_user, p_amount, p_op, 'active', v_expires, v_now, p_metadata, p_overcapture);

    -- The hold: the free tokens of the live grants in burn order (grants.hold).
    v_left := p_amount;
    FOR g IN
        SELECT gr.id, gr.remaining - gr.held AS free
        FROM grants gr
        WHERE gr.user_id = p_user AND gr.status = 'active' AND gr.remaining > gr.held
          AND (gr.expires_at IS NULL OR gr.expires_at > v_now)
        ORDER BY gr.priority, gr.expires_at NULLS LAST, gr.created_at, gr.id
    LOOP
        v_take := least(g.free, v_left);
        UPDATE grants SET held = held + v_take WHERE id = g.id;
        INSERT INTO reservation_grants (reservation_id, grant_id, amount)
        VALUES (p_id, g.id, v_take);
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    IF v_left > 0 THEN
        RAISE EXCEPTION 'hold of % beyond the free tokens', p_amount;
    END IF;
    UPDATE accounts SET tokens_reserved = tokens_reserved + p_amount, updated_at = v_now
    WHERE user_id = p_user;

    -- ReserveOut as pydantic writes it (expires_at by datetime.isoformat()).
    response := jsonb_build_object(
        'success', true, 'reservation_id', p_id, 'amount', p_amount,
        'expires_at', to_char(v_expires AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
            || CASE WHEN date_trunc('second', v_expires) = v_expires THEN ''
                    ELSE to_char(v_expires AT TIME ZONE 'UTC', '.US') END
            || '+00:00',
        'tokens_available', available - p_amount, 'replayed', false);
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records r SET response = tokens_reserve.response
        WHERE r.user_id = p_user AND r.key = p_key;
    END IF;
    status := 'ok';
END
$fn$;
