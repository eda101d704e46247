CREATE OR REPLACE FUNCTION tokens_json_bytes(p jsonb) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $fn$
-- The compact JSON size of a stored value: models.schemas.metadata_bytes, which counts each
-- number as it is stored (numeric's own text), so a number is its text here.
BEGIN
    CASE jsonb_typeof(p)
    WHEN 'object' THEN
        RETURN 1 + (SELECT coalesce(sum(octet_length(to_jsonb(e.key)::text) + 2
                                        + tokens_json_bytes(e.value)), 1)
                    FROM jsonb_each(p) e);
    WHEN 'array' THEN
        RETURN 1 + (SELECT coalesce(sum(1 + tokens_json_bytes(e.value)), 1)
                    FROM jsonb_array_elements(p) e);
    ELSE
        RETURN octet_length(p::text);
    END CASE;
END
$fn$;
