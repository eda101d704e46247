CREATE OR REPLACE FUNCTION tokens_canonical_value(v jsonb) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
-- An object's member or an array's element as tokens_canonical writes it: a container through
-- tokens_canonical, a number written with a point or an exponent through
-- tokens_canonical_number, anything else (a string, an int, true, false, null) as jsonb writes
-- it. One expression, so the planner inlines it where many are written (tokens_canonical_objects):
-- no call per value.
SELECT CASE
    WHEN jsonb_typeof(v) IN ('object', 'array') THEN tokens_canonical(v)
    WHEN jsonb_typeof(v) = 'number' AND v::text ~ '[.eE]' THEN tokens_canonical_number(v::text)
    ELSE v::text
END
$fn$;
