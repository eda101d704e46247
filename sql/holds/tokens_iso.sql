CREATE OR REPLACE FUNCTION tokens_iso(p timestamptz) RETURNS text
LANGUAGE plpgsql IMMUTABLE AS $fn$
-- A time as pydantic writes it in a result (datetime.isoformat() in UTC): microseconds only
-- when there are any.
BEGIN
    RETURN to_char(p AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
        || CASE WHEN date_trunc('second', p) = p THEN ''
                ELSE to_char(p AT TIME ZONE 'UTC', '.US') END
        || '+00:00';
END
$fn$;
