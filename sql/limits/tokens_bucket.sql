CREATE OR REPLACE FUNCTION tokens_bucket(p_grain text, p_at timestamptz) RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
-- The start of the bucket of width p_grain that holds p_at: a calendar week (from Monday) or
-- month, UTC, or N whole seconds since the epoch ('60s': a UTC minute; '86400s': a UTC day).
-- Nothing in it is less stable than its declaration, so a query calling it inlines it.
    SELECT CASE p_grain
        WHEN 'week' THEN date_trunc('week', p_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        WHEN 'month' THEN date_trunc('month', p_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
        ELSE to_timestamp(CAST(
            floor(extract(epoch FROM p_at - timestamptz '1970-01-01 00:00:00+00')
                  / CAST(rtrim(p_grain, 's') AS integer))
            * CAST(rtrim(p_grain, 's') AS integer) AS double precision))
    END
$fn$;
