CREATE OR REPLACE FUNCTION tokens_capture(
    p_reservation text, p_amount bigint, p_metadata jsonb, p_tail_bytes bigint,
    p_max_bytes bigint, p_key text, p_digest text, p_now timestamptz,
    OUT status text, OUT reservation_status text, OUT bound bigint, OUT captured bigint,
    OUT metadata_bytes bigint, OUT hold bigint, OUT reserved bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[],
    OUT ended_tokens bigint[], OUT ended_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
-- A member's reservation (spent_by) holds its pool's grants (user_id): the capture spends
-- them and writes the pool's entry, spent by the member, under the member's key.
#variable_conflict use_column
DECLARE
    v_user text;
    v_spender text;
    v_limited boolean;
    v_limit bigint;
    v_meta jsonb;
    v_op text;
    v_now timestamptz;
    v_at timestamptz;
    v_left bigint;
    v_take bigint;
    v_pos integer;
    v_entry bigint;
    v_gids bigint[] := '{}';
    v_amounts bigint[] := '{}';
    g record;
    b record;
BEGIN
    -- The reservation and the time its state is judged at (reservations._load_at, _status).
    v_now := coalesce(p_now, clock_timestamp());
    SELECT r.user_id, coalesce(r.spent_by, r.user_id), r.amount, r.overcapture_limit, r.metadata,
           CASE WHEN r.status = 'active' AND r.expires_at <= v_now THEN 'expired' ELSE r.status END
    INTO v_user, v_spender, hold, v_limit, v_meta, reservation_status
    FROM reservations r WHERE r.id = p_reservation;
    IF NOT FOUND THEN
        status := 'reservation_not_found';
        RETURN;
    END IF;

    -- The key before the reservation's lock (accounting/idempotency.py claim).
    SELECT c.status, c.response INTO status, response
    FROM tokens_claim(v_spender, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;

    IF reservation_status <> 'active' THEN
        status := 'not_active';
        RETURN;
    END IF;
    captured := coalesce(p_amount, hold);
    IF captured > hold + v_limit THEN
        status := 'exceeds';
        bound := hold + v_limit;
        RETURN;
    END IF;
    -- The entry's metadata: the reservation's, the capture's and the id (Python sized the last
    -- two as p_tail_bytes; each key of the first they do not override adds itself and a comma).
    metadata_bytes := p_tail_bytes + (
        SELECT coalesce(sum(octet_length(to_jsonb(m.key)::text) + 2
                            + tokens_json_bytes(m.value)), 0)
        FROM jsonb_each(v_meta) m
        WHERE NOT (p_metadata ? m.key) AND m.key <> 'reservation_id');
    IF metadata_bytes > p_max_bytes THEN
        status := 'metadata';
        RETURN;
    END IF;

    -- End it: of a capture, a release and the expiry sweep, the first to lock the row wins.
    UPDATE reservations r SET status = 'captured', settled_at = clock_timestamp()
    WHERE r.id = p_reservation AND r.status = 'active' AND r.expires_at > v_now
    RETURNING r.operation_type, r.amount, r.overcapture_limit INTO v_op, hold, v_limit;
    IF NOT FOUND THEN
        SELECT CASE WHEN r.status = 'active' AND r.expires_at <= v_now THEN 'expired'
                    ELSE r.status END
        INTO reservation_status FROM reservations r WHERE r.id = p_reservation;
        status := CASE WHEN FOUND THEN 'not_active' ELSE 'reservation_not_found' END;
        RETURN;
    END IF;
    -- tokens.extend may have grown the hold since it was read.
    captured := coalesce(p_amount, hold);
    IF captured > hold + v_limit THEN
        status := 'exceeds';
        bound := hold + v_limit;
        RETURN;
    END IF;

    -- The account lock (grants.lock) and the movement's time; due grants expire first.
    SELECT l.moment, l.expired_tokens, l.expired_balances, l.limited
    INTO v_at, expired_tokens, expired_balances, v_limited FROM tokens_lock(v_user) l;
    -- Never refused for a limit (the work was done): the spend counts, the hold stops counting.
    PERFORM tokens_limit(v_user, v_spender, v_limited, captured, v_at, -hold, v_at, false);

    -- The held grants in burn order (grants.Change.spend_held): spent, the rest of the hold freed.
    v_left := captured;
    FOR g IN
        SELECT rg.grant_id AS id, rg.amount AS held
        FROM reservation_grants rg JOIN grants gr ON gr.id = rg.grant_id
        WHERE rg.reservation_id = p_reservation
        ORDER BY tokens_burn_order(gr.priority, gr.expires_at, gr.created_at, gr.id)
    LOOP
        v_take := least(g.held, v_left);
        UPDATE grants SET
            remaining = remaining - v_take,
            spent = spent + v_take,
            held = held - g.held,
            status = CASE WHEN remaining = v_take THEN 'depleted' ELSE status END,
            ended_at = CASE WHEN remaining = v_take THEN v_at ELSE ended_at END
        WHERE id = g.id;
        IF v_take > 0 THEN
            v_gids := v_gids || g.id;
            v_amounts := v_amounts || -v_take;
        END IF;
        v_left := v_left - v_take;
    END LOOP;

    -- Past the hold: free grants in burn order (grants.Change.spend), one split per grant.
    IF v_left > 0 THEN
        SELECT * INTO b FROM tokens_burn(v_user, v_left, v_at);
        FOR i IN 1 .. cardinality(b.gids) LOOP
            v_pos := array_position(v_gids, b.gids[i]);
            IF v_pos IS NULL THEN
                v_gids := v_gids || b.gids[i];
                v_amounts := v_amounts || b.amounts[i];
            ELSE
                v_amounts[v_pos] := v_amounts[v_pos] + b.amounts[i];
            END IF;
        END LOOP;
        v_left := b.uncovered;
    END IF;

    -- The account, the entry and its split (grants.write); what no grant covered is debt.
    SELECT w.entry_id, w.reserved, w.response INTO v_entry, reserved, response
    FROM tokens_write(v_user, 'capture', coalesce(v_op, 'capture'), -captured, v_left,
                      captured, p_key,
                      v_meta || p_metadata || jsonb_build_object('reservation_id', p_reservation),
                      v_at, v_gids, v_amounts, NULL, -hold, nullif(v_spender, v_user)) w;
    response := response || jsonb_build_object(
        'overcaptured', greatest(0, captured - hold), 'shortfall', v_left);
    -- Held tokens of a grant that ended meanwhile, and not captured, now leave with it.
    SELECT * INTO ended_tokens, ended_balances FROM tokens_expire_due(v_user, v_at);
    UPDATE reservations r SET ledger_entry_id = v_entry, captured_amount = captured
    WHERE r.id = p_reservation;
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records r SET response = tokens_capture.response
        WHERE r.user_id = v_spender AND r.key = p_key;
    END IF;
    status := 'ok';
END
$fn$;
