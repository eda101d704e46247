CREATE OR REPLACE FUNCTION tokens_canonical_number(t text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE SET extra_float_digits = 1 AS $fn$
-- A jsonb number as Python writes it once read back: written without a point or an exponent it
-- is an int (its digits); otherwise a float, in repr's shortest round-trip form, which is
-- float8's output (extra_float_digits 1) but for two differences: repr writes an exponent of
-- 15 positionally, and an integral float with ".0".
DECLARE
    f text;
BEGIN
    IF t !~ '[.eE]' THEN
        RETURN t;
    END IF;
    f := t::float8::text;
    IF f ~ 'e\+15$' THEN
        f := f::numeric::text;
    END IF;
    IF f !~ '[.e]' THEN
        f := f || '.0';
    END IF;
    RETURN f;
END
$fn$;
