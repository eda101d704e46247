CREATE OR REPLACE FUNCTION tokens_verify(
    p_users text[], p_max integer, OUT checked bigint, OUT broken jsonb
) LANGUAGE sql STABLE
-- A page's sorts and its hash join in memory rather than on disk (the default is 4 MB). No
-- JIT: planned for unknown users, a page's cost is guessed past jit_above_cost, and compiling
-- its 77 functions took 30 ms of a page of one user's 35.
SET work_mem = '64MB' SET jit = off AS $fn$
-- The chains of p_users (a page of them: one plan, one sort per page), in the contract's order
-- per user: each entry's prev_hash is the previous entry's hash (zeros for the first), its hash
-- is recomputed, its balance_before is the previous balance_after (0 for the first); a
-- carried_forward checkpoint, first of its user, is trusted for its hash. Then each account's
-- balance equals the sum of its ledger and its last balance_after. broken: the first p_max
-- problems, by user then order.
WITH entries AS MATERIALIZED (
    SELECT l.metadata, l.operation_type, l.idempotency_key, l.original_entry_id, l.spent_by,
           l.user_id, l.id, l.kind, l.prev_hash, l.hash, l.balance_before,
           l.balance_after, l.tokens_amount, l.created_at,
           lag(l.hash) OVER w AS lag_hash, lag(l.balance_after) OVER w AS lag_after,
           row_number() OVER w AS n, count(*) OVER u AS cnt, sum(l.tokens_amount) OVER u AS total,
           row_number() OVER (ORDER BY l.user_id, l.created_at, l.id) AS pos
    FROM ledger_entries l
    WHERE l.user_id = ANY(p_users)
    WINDOW u AS (PARTITION BY l.user_id),
           w AS (PARTITION BY l.user_id ORDER BY l.created_at, l.id)
), chunks AS (
    -- The entries' metadata, 10,000 at a time (one user may have millions), each chunk written
    -- with one call of tokens_canonical_objects (one sort) and matched back by its place.
    SELECT (e.pos - 1) / 10000 AS chunk, array_agg(e.metadata ORDER BY e.pos) AS metadata
    FROM entries e
    GROUP BY 1
), metadata AS (
    SELECT c.chunk * 10000 + m.n AS pos, m.canonical
    FROM chunks c CROSS JOIN LATERAL tokens_canonical_objects(c.metadata) AS m
), per_entry AS (
    SELECT e.user_id, e.id, e.created_at,
           CASE
               WHEN e.kind = 'carried_forward' AND e.n > 1 THEN 'checkpoint'
               WHEN e.prev_hash IS DISTINCT FROM coalesce(e.lag_hash, repeat('0', 64))
                   THEN 'prev_hash'
               WHEN e.kind = 'carried_forward' THEN NULL
               WHEN e.hash IS DISTINCT FROM tokens_entry_hash(
                       e.prev_hash, e.id, e.user_id, e.operation_type, e.tokens_amount,
                       e.balance_before, e.balance_after, e.idempotency_key, e.original_entry_id,
                       e.created_at, e.spent_by, m.canonical)
                   THEN 'hash'
               WHEN e.balance_before <> coalesce(e.lag_after, 0) THEN 'balance_before'
           END AS reason
    FROM entries e JOIN metadata m ON m.pos = e.pos
), totals AS (
    SELECT e.user_id, e.total, e.balance_after AS last_after, e.id AS last_id,
           e.created_at AS last_at
    FROM entries e WHERE e.n = e.cnt
), per_account AS (
    SELECT a.user_id, t.last_id AS id, t.last_at AS created_at, 'balance' AS reason
    FROM accounts a LEFT JOIN totals t ON t.user_id = a.user_id
    WHERE a.user_id = ANY(p_users)
      AND (a.tokens_balance <> coalesce(t.total, 0)
           OR a.tokens_balance <> coalesce(t.last_after, 0))
), problems AS (
    SELECT user_id, id, created_at, reason FROM per_entry WHERE reason IS NOT NULL
    UNION ALL
    SELECT user_id, id, created_at, reason FROM per_account
)
SELECT (SELECT count(*) FROM entries),
       coalesce((
           SELECT jsonb_agg(jsonb_build_object(
                      'user_id', p.user_id, 'entry_id', p.id::text, 'reason', p.reason)
                  ORDER BY p.user_id, p.created_at, p.id)
           FROM (SELECT * FROM problems ORDER BY user_id, created_at, id LIMIT p_max) p),
           '[]'::jsonb)
$fn$;
