CREATE OR REPLACE FUNCTION tokens_partitions(
    p_parent regclass, OUT name text, OUT lower timestamptz, OUT upper timestamptz
) RETURNS SETOF record LANGUAGE sql STABLE AS $fn$
-- The monthly partitions of p_parent (the ledger's tables, by created_at; events, by at),
-- oldest first: lower is NULL for `before` (from MINVALUE, everything before the first month),
-- upper NULL for `after` (to MAXVALUE, everything past the newest month).
SELECT c.relname::text,
       CAST(substring(b.bound FROM 'FROM \(''([^'']+)''\)') AS timestamptz),
       CAST(substring(b.bound FROM 'TO \(''([^'']+)''\)') AS timestamptz)
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b
WHERE i.inhparent = p_parent
ORDER BY 3 NULLS LAST
$fn$;
