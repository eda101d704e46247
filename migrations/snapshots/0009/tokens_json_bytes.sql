CREATE OR REPLACE FUNCTION tokens_json_bytes(p jsonb) RETURNS bigint
LANGUAGE plpgsql IMMUTABLE AS $fn$
DECLARE
    t text;
    digits text;
    sig text;
    n integer;
    decpt integer;
    sign integer;
BEGIN
    CASE jsonb_typeof(p)
    WHEN 'object' THEN
        RETURN 1 + (SELECT coalesce(sum(octet_length(to_jsonb(e.key)::text) + 2
                                        + tokens_json_bytes(e.value)), 1)
                    FROM jsonb_each(p) e);
    WHEN 'array' THEN
        RETURN 1 + (SELECT coalesce(sum(1 + tokens_json_bytes(e.value)), 1)
                    FROM jsonb_array_elements(p) e);
    WHEN 'number' THEN
        t := p::text;
        IF position('.' IN t) = 0 THEN
            RETURN octet_length(t);
        END IF;
        -- Python's repr of the float: its digits (numeric keeps what repr wrote) and point.
        sign := CASE WHEN left(t, 1) = '-' THEN 1 ELSE 0 END;
        t := ltrim(t, '-');
        digits := replace(t, '.', '');
        sig := rtrim(ltrim(digits, '0'), '0');
        n := length(sig);
        IF n = 0 THEN
            RETURN 3 + sign;
        END IF;
        decpt := position('.' IN t) - 1 - (length(digits) - length(ltrim(digits, '0')));
        IF decpt <= -4 OR decpt > 16 THEN
            RETURN sign + CASE WHEN n = 1 THEN 1 ELSE n + 1 END + 2
                   + greatest(2, length(abs(decpt - 1)::text));
        ELSIF decpt <= 0 THEN
            RETURN sign + 2 - decpt + n;
        ELSIF decpt < n THEN
            RETURN sign + n + 1;
        END IF;
        RETURN sign + decpt + 2;
    ELSE
        RETURN octet_length(p::text);
    END CASE;
END
$fn$;
