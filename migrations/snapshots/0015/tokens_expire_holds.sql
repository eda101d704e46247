CREATE OR REPLACE FUNCTION tokens_expire_holds(
    p_limit integer, p_now timestamptz,
    OUT expired integer, OUT users text[], OUT balances bigint[], OUT reserveds bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
-- Expire up to p_limit active reservations past their end at p_now (NULL: the database's
-- clock), oldest end first, and free what they held (tokens_unhold); expired counts them (a
-- full p_limit: call again), and each account changed comes with its balance and reserved
-- tokens after. Rows a capture or release is ending right now are theirs (SKIP LOCKED; the
-- status is checked again on every row locked here). Expiry runs take turns (an advisory lock:
-- two at once could lock their chunks' accounts in different orders).
#variable_conflict use_column
DECLARE
    v_now timestamptz := coalesce(p_now, clock_timestamp());
    v_ids text[];
BEGIN
    PERFORM pg_advisory_xact_lock(125780053291638);  -- "reserv"
    WITH due AS (
        SELECT r.id FROM reservations r
        WHERE r.status = 'active' AND r.expires_at <= v_now
        ORDER BY r.expires_at
        LIMIT p_limit
        FOR UPDATE SKIP LOCKED
    ), gone AS (
        UPDATE reservations r SET status = 'expired', settled_at = v_now
        FROM due WHERE r.id = due.id AND r.status = 'active'
        RETURNING r.id
    )
    SELECT array_agg(gone.id) INTO v_ids FROM gone;
    expired := coalesce(cardinality(v_ids), 0);
    IF expired = 0 THEN
        RETURN;
    END IF;
    SELECT array_agg(u.user_id ORDER BY u.user_id), array_agg(u.balance ORDER BY u.user_id),
           array_agg(u.reserved ORDER BY u.user_id)
    INTO users, balances, reserveds
    FROM tokens_unhold(v_ids, NULL) u;
END
$fn$;
