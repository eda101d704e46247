CREATE OR REPLACE FUNCTION tokens_canonical(j jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
-- A JSON value as Python's json.dumps(value, sort_keys=True, separators=(",", ":"),
-- ensure_ascii=False) writes it once read back from this jsonb: an object by
-- tokens_canonical_objects, an array's elements in order by tokens_canonical_value, an int as its
-- digits, a float by tokens_canonical_number, a string (escaped as both escape it), true, false
-- and null as jsonb writes them. The hash chain's canonical form (tokens_entry_hash).
BEGIN
    CASE jsonb_typeof(j)
    WHEN 'object' THEN
        RETURN (SELECT o.canonical FROM tokens_canonical_objects(ARRAY[j]) AS o);
    WHEN 'array' THEN
        RETURN '[' || coalesce(
            (SELECT string_agg(tokens_canonical_value(e.v), ',' ORDER BY e.n)
             FROM jsonb_array_elements(j) WITH ORDINALITY AS e(v, n)),
            '') || ']';
    WHEN 'number' THEN
        RETURN tokens_canonical_number(j::text);
    ELSE
        RETURN j::text;
    END CASE;
END
$fn$;
