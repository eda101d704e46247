CREATE OR REPLACE FUNCTION tokens_release(
    p_id text, p_key text, p_digest text, p_reason text,
    OUT status text, OUT owner text, OUT reservation_status text, OUT balance bigint,
    OUT reserved bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
-- owner: the pool whose grants the reservation holds; its key is its spender's (the member
-- that made it, else the owner).
DECLARE
    v_now timestamptz;
    v_spender text;
BEGIN
    -- A reservation's user never changes, so it is read without a lock, before the key.
    SELECT r.user_id, coalesce(r.spent_by, r.user_id), r.status
    INTO owner, v_spender, reservation_status
    FROM reservations r WHERE r.id = p_id;
    IF NOT FOUND THEN
        status := 'not_found';
        RETURN;
    END IF;
    SELECT c.status, c.response INTO status, response
    FROM tokens_claim(v_spender, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;
    IF reservation_status <> 'active' THEN
        status := 'not_active';
        RETURN;
    END IF;

    UPDATE reservations r SET
        status = 'released',
        settled_at = clock_timestamp(),
        metadata = CASE WHEN p_reason IS NULL THEN r.metadata
                        ELSE r.metadata || jsonb_build_object('release_reason', p_reason) END
    WHERE r.id = p_id AND r.status = 'active';
    IF NOT FOUND THEN
        -- Lost the race: the re-read sees what the winner committed.
        SELECT r.status INTO reservation_status FROM reservations r WHERE r.id = p_id;
        status := 'not_active';
        RETURN;
    END IF;
    reservation_status := 'released';

    -- The time once the account is held (see tokens_lock), then the hold freed
    -- (tokens_unhold): balance and reserved are the account's then, before the expiries.
    SELECT greatest(clock_timestamp(), l.updated_at) INTO v_now
    FROM (SELECT a.updated_at FROM accounts a WHERE a.user_id = owner FOR UPDATE) l;
    SELECT u.balance, u.reserved INTO balance, reserved FROM tokens_unhold(ARRAY[p_id], v_now) u;
    SELECT e.tokens, e.balances INTO expired_tokens, expired_balances
    FROM tokens_expire_due(owner, v_now) e;

    response := jsonb_build_object(
        'success', true, 'reservation_id', p_id, 'status', 'released');
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records r SET response = tokens_release.response
        WHERE r.user_id = v_spender AND r.key = p_key;
    END IF;
    status := 'ok';
END
$fn$;
