CREATE OR REPLACE FUNCTION tokens_canonical(j jsonb) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $fn$
-- A JSON value as Python's json.dumps(value, sort_keys=True, separators=(",", ":"),
-- ensure_ascii=False) writes it once read back from this jsonb: keys by code point (the bytes
-- of UTF-8, collation "C"), strings escaped as both escape them, an int as its digits, a float
-- by tokens_canonical_number. The hash chain's canonical form (tokens_entry_hash). Scalars
-- inside a container are written in place, without a call each.
BEGIN
    CASE jsonb_typeof(j)
    WHEN 'object' THEN
        RETURN coalesce(
            (SELECT '{' || string_agg(
                        to_json(e.k)::text || ':' || CASE
                            WHEN jsonb_typeof(e.v) IN ('object', 'array')
                                THEN tokens_canonical(e.v)
                            WHEN jsonb_typeof(e.v) = 'number' AND e.v::text ~ '[.eE]'
                                THEN tokens_canonical_number(e.v::text)
                            ELSE e.v::text END,
                        ',' ORDER BY e.k COLLATE "C") || '}'
             FROM jsonb_each(j) AS e(k, v)),
            '{}');
    WHEN 'array' THEN
        RETURN coalesce(
            (SELECT '[' || string_agg(
                        CASE
                            WHEN jsonb_typeof(e.v) IN ('object', 'array')
                                THEN tokens_canonical(e.v)
                            WHEN jsonb_typeof(e.v) = 'number' AND e.v::text ~ '[.eE]'
                                THEN tokens_canonical_number(e.v::text)
                            ELSE e.v::text END,
                        ',' ORDER BY e.n) || ']'
             FROM jsonb_array_elements(j) WITH ORDINALITY AS e(v, n)),
            '[]');
    WHEN 'number' THEN
        RETURN tokens_canonical_number(j::text);
    ELSE
        RETURN j::text;  -- a string (escaped as Python escapes it), true, false, null
    END CASE;
END
$fn$;
