CREATE OR REPLACE FUNCTION tokens_ok(p_row jsonb) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $fn$
BEGIN
    IF p_row->>'status' IN ('ok', 'replay') THEN
        RETURN true;
    END IF;
    RAISE EXCEPTION USING ERRCODE = 'TKREF', MESSAGE = 'refused: ' || (p_row->>'status'),
                          DETAIL = p_row::text;
END
$fn$;
