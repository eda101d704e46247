CREATE OR REPLACE FUNCTION tokens_ledger_partitions(
    OUT name text, OUT lower timestamptz, OUT upper timestamptz
) RETURNS SETOF record LANGUAGE sql STABLE AS $fn$
-- The ledger's partitions (of ledger_entries; entry_grants has the same months under the same
-- suffixes), oldest first: lower is NULL for `before` (from MINVALUE, everything before the
-- first month), upper NULL for `after` (to MAXVALUE, everything past the newest month).
SELECT c.relname::text,
       CAST(substring(b.bound FROM 'FROM \(''([^'']+)''\)') AS timestamptz),
       CAST(substring(b.bound FROM 'TO \(''([^'']+)''\)') AS timestamptz)
FROM pg_inherits i
JOIN pg_class c ON c.oid = i.inhrelid
CROSS JOIN LATERAL (SELECT pg_get_expr(c.relpartbound, c.oid) AS bound) b
WHERE i.inhparent = 'ledger_entries'::regclass
ORDER BY 3 NULLS LAST
$fn$;
