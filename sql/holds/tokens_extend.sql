CREATE OR REPLACE FUNCTION tokens_extend(
    p_id text, p_key text, p_digest text, p_amount bigint, p_ttl integer,
    OUT status text, OUT owner text, OUT reservation_status text, OUT available bigint,
    OUT balance bigint, OUT reserved bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[], OUT refused jsonb
) LANGUAGE plpgsql VOLATILE AS $fn$
-- Hold p_amount more of an active reservation (tokens_hold) and/or keep it alive until
-- now + p_ttl seconds, never past 7 days after it was made and never earlier than it ends now.
-- status: 'ok', 'replay', 'conflict', 'not_found', 'not_active' (with reservation_status) or
-- 'insufficient' (with available) or 'limit' (refused: the limit, tokens_limit). Lock order:
-- the key (its spender's: the member that made it), the reservation, the account (owner, the
-- pool whose grants it holds).
#variable_conflict use_column
DECLARE
    v_now timestamptz;
    v_expires timestamptz;
    v_spender text;
    v_limited boolean;
    r record;
BEGIN
    expired_tokens := '{}';
    expired_balances := '{}';
    -- A reservation's user never changes, so it is read without a lock, before the key.
    SELECT rr.user_id, coalesce(rr.spent_by, rr.user_id) INTO owner, v_spender
    FROM reservations rr WHERE rr.id = p_id;
    IF NOT FOUND THEN
        status := 'not_found';
        RETURN;
    END IF;
    SELECT c.status, c.response INTO status, response
    FROM tokens_claim(v_spender, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;
    SELECT rr.status, rr.amount, rr.expires_at, rr.created_at INTO r
    FROM reservations rr WHERE rr.id = p_id FOR UPDATE;
    reservation_status := r.status;
    IF r.status <> 'active' THEN
        status := 'not_active';
        RETURN;
    END IF;
    SELECT l.balance, l.reserved, l.moment, l.expired_tokens, l.expired_balances, l.limited
    INTO balance, reserved, v_now, expired_tokens, expired_balances, v_limited
    FROM tokens_lock(owner) l;
    IF r.expires_at <= v_now THEN
        status := 'not_active';
        reservation_status := 'expired';
        RETURN;
    END IF;
    available := balance - reserved;
    IF p_amount > 0 AND available < p_amount THEN
        status := 'insufficient';
        RETURN;
    END IF;
    IF p_amount > 0 THEN
        refused := tokens_limit(owner, v_spender, v_limited, 0, v_now, p_amount, v_now, true);
        IF refused IS NOT NULL THEN
            status := 'limit';
            RETURN;
        END IF;
    END IF;
    v_expires := r.expires_at;
    IF p_ttl IS NOT NULL THEN
        v_expires := greatest(r.expires_at, least(v_now + make_interval(secs => p_ttl),
                                                  r.created_at + interval '7 days'));
    END IF;
    IF p_amount > 0 THEN
        PERFORM tokens_hold(owner, p_id, p_amount, v_now);
        reserved := reserved + p_amount;
        available := available - p_amount;
    END IF;
    UPDATE reservations SET amount = amount + p_amount, expires_at = v_expires WHERE id = p_id;
    response := jsonb_build_object(
        'success', true, 'reservation_id', p_id, 'amount', r.amount + p_amount,
        'expires_at', tokens_iso(v_expires), 'tokens_available', available);
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records ir SET response = tokens_extend.response
        WHERE ir.user_id = v_spender AND ir.key = p_key;
    END IF;
    status := 'ok';
END
$fn$;
