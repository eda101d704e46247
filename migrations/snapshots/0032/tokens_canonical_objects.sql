CREATE OR REPLACE FUNCTION tokens_canonical_objects(p_values jsonb[])
RETURNS TABLE (n bigint, canonical text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
-- The canonical JSON of each of p_values (n: its place, from 1), in no order: an object's
-- members by key in code point order (the bytes of UTF-8, collation "C"), each value by
-- tokens_canonical_value; anything but an object by tokens_canonical. Every member of every
-- value goes through one sort: ledger.verify writes a page of entries' metadata with one call,
-- where ordering each object's members apart costs a sort set up and torn down per entry (ten
-- times the rest of its hashing).
SELECT w.n, w.canonical
FROM (
    SELECT o.n,
           CASE WHEN jsonb_typeof(o.j) = 'object'
                THEN '{' || coalesce(
                    string_agg(to_json(e.k)::text || ':' || tokens_canonical_value(e.v), ',')
                        OVER members,
                    '') || '}'
                ELSE tokens_canonical(o.j) END AS canonical,
           row_number() OVER members AS r
    FROM unnest(p_values) WITH ORDINALITY AS o(j, n)
    LEFT JOIN LATERAL jsonb_each(CASE WHEN jsonb_typeof(o.j) = 'object' THEN o.j END) AS e(k, v)
        ON true
    WINDOW members AS (PARTITION BY o.n ORDER BY e.k COLLATE "C"
                       ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)
) w
WHERE w.r = 1
$fn$;
