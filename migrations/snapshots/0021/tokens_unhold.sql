CREATE OR REPLACE FUNCTION tokens_unhold(p_ids text[], p_now timestamptz)
RETURNS TABLE (user_id text, balance bigint, reserved bigint)
LANGUAGE plpgsql VOLATILE AS $fn$
-- Free what the given ended reservations held: their users' accounts are locked in user order
-- (as every statement over several accounts locks them), then the grants' holds and the
-- accounts' tokens_reserved go down, the accounts stamped at p_now (NULL: the database's clock),
-- never before their previous change. Tokens freed in a grant that has ended are then due; the
-- caller expires them (tokens_expire_due) or leaves them to grants.expire and the next read.
-- One row per account: its balance and reserved tokens after. What members made stops
-- counting for them and the accounts above them (tokens_limit).
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM accounts a
    WHERE a.user_id IN (SELECT r.user_id FROM reservations r WHERE r.id = ANY(p_ids))
    ORDER BY a.user_id
    FOR UPDATE;
    PERFORM tokens_limit(h.pool, h.spender, a.limited, 0, NULL, -h.n,
                         coalesce(p_now, clock_timestamp()), false)
    FROM (SELECT CAST(r.user_id AS text) AS pool,
                 CAST(coalesce(r.spent_by, r.user_id) AS text) AS spender,
                 CAST(sum(r.amount) AS bigint) AS n
          FROM reservations r WHERE r.id = ANY(p_ids) GROUP BY 1, 2) h
    JOIN accounts a ON a.user_id = h.pool
    WHERE h.spender <> h.pool OR a.limited;
    UPDATE grants g SET held = g.held - h.n
    FROM (SELECT rg.grant_id, sum(rg.amount) AS n FROM reservation_grants rg
          WHERE rg.reservation_id = ANY(p_ids) GROUP BY rg.grant_id) h
    WHERE g.id = h.grant_id;
    RETURN QUERY
    UPDATE accounts a SET
        tokens_reserved = a.tokens_reserved - h.n,
        updated_at = greatest(coalesce(p_now, clock_timestamp()), a.updated_at)
    FROM (SELECT r.user_id, sum(r.amount) AS n FROM reservations r
          WHERE r.id = ANY(p_ids) GROUP BY r.user_id) h
    WHERE a.user_id = h.user_id
    RETURNING CAST(a.user_id AS text), a.tokens_balance, a.tokens_reserved;
END
$fn$;
