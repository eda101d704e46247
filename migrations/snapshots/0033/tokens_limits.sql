CREATE OR REPLACE FUNCTION tokens_limits(
    p_user text, p_now timestamptz, p_requested bigint DEFAULT 0, p_listed boolean DEFAULT true
) RETURNS TABLE (
    user_id text, name text, max_tokens bigint, used bigint, grain text, lo timestamptz,
    refuses boolean, listed jsonb
) LANGUAGE plpgsql STABLE AS $fn$
-- Every limit that applies to p_user at p_now (NULL: its pool's clock), in the contract's
-- order: p_user's own, then its parent's, up to the pool, each account's by name. used: what
-- the account the limit is set on and those below it spent in the window (its buckets, less
-- refunds of those spends) plus what their active reservations hold now (a pool's
-- tokens_reserved, a member's subtree_held), less holds already past their end that no sweep
-- has ended yet. refuses: p_requested more (spent or held) would take used past max_tokens,
-- the one test of a limit (the first limit that refuses is the refusing one). listed: the
-- limit as tokens.limits shows it (NULL unless p_listed: a movement, which reads a limit's listing
-- only when it refuses or reaches it, builds none per debit). PL/pgSQL, so its plan is made once
-- per session.
#variable_conflict use_column
BEGIN
    RETURN QUERY
    WITH me AS (
        SELECT a.user_id, a.parent_id, coalesce(a.pool_id, a.user_id) AS pool
        FROM accounts a WHERE a.user_id = p_user
    ), at AS (
        SELECT coalesce(p_now, greatest(clock_timestamp(), p.updated_at)) AS now
        FROM me JOIN accounts p ON p.user_id = me.pool
    ), chain AS (
        SELECT me.user_id AS uid, 1 AS ord FROM me
        UNION ALL
        SELECT me.parent_id, 2 FROM me WHERE me.parent_id <> me.pool
        UNION ALL
        SELECT me.pool, 3 FROM me WHERE me.pool <> me.user_id
    ), held AS MATERIALIZED (
        SELECT c.uid, c.ord,
               CASE WHEN a.pool_id IS NULL THEN a.tokens_reserved ELSE a.subtree_held END
               - coalesce((
                   SELECT sum(r.amount) FROM reservations r
                   JOIN accounts s ON s.user_id = coalesce(r.spent_by, r.user_id)
                   WHERE r.status = 'active' AND r.expires_at <= (SELECT now FROM at)
                     AND r.user_id = (SELECT pool FROM me)
                     AND c.uid IN (s.user_id, s.parent_id, r.user_id)), 0) AS tokens
        FROM chain c JOIN accounts a ON a.user_id = c.uid
        WHERE EXISTS (SELECT 1 FROM spend_limits l WHERE l.user_id = c.uid)
    )
    SELECT CAST(l.user_id AS text), CAST(l.name AS text), l.max_tokens, u.used, w.grain, w.lo,
           u.used + p_requested > l.max_tokens,
           CASE WHEN p_listed THEN jsonb_build_object(
               'user_id', l.user_id, 'name', l.name, 'max_tokens', l.max_tokens,
               'period', l.period, 'rolling', l.rolling, 'used', u.used,
               'remaining', greatest(l.max_tokens - u.used, 0),
               'resets_at', tokens_iso(CASE WHEN NOT l.rolling THEN w.hi + w.leaves
                                            ELSE s.oldest + w.leaves END)) END
    FROM held h
    CROSS JOIN at
    JOIN spend_limits l ON l.user_id = h.uid
    CROSS JOIN LATERAL tokens_window(l.period, l.rolling, at.now) w
    CROSS JOIN LATERAL (
        SELECT coalesce(sum(b.tokens), 0) AS spent,
               min(b.bucket) FILTER (WHERE b.tokens > 0) AS oldest
        FROM limit_buckets b
        WHERE b.user_id = l.user_id AND b.grain = w.grain AND b.bucket BETWEEN w.lo AND w.hi
    ) s
    CROSS JOIN LATERAL (SELECT CAST(s.spent + h.tokens AS bigint) AS used OFFSET 0) u
    ORDER BY h.ord, l.name COLLATE "C";
END
$fn$;
