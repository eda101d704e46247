CREATE OR REPLACE FUNCTION tokens_window(p_period text, p_rolling boolean, p_now timestamptz)
RETURNS TABLE (grain text, lo timestamptz, hi timestamptz, leaves interval)
LANGUAGE sql STABLE PARALLEL SAFE ROWS 1 AS $fn$
-- A limit's window at p_now, as the buckets (tokens_bucket) it sums: those starting from lo to
-- hi. A spend leaves the window once p_now reaches its bucket's start + leaves.
-- Calendar: one bucket, the UTC minute, hour, day, week (from Monday) or month holding p_now.
-- Rolling (the last 60 s, 1 h, 24 h, 7 days, 30 days): buckets of a sixtieth to a hundred and
-- twentieth of the span (1 s, 1 min, 15 min, 2 h, 6 h), the current one and every one that
-- started within the span before it. So every spend of the last span is counted (none is
-- older than span + one bucket): no interval of the span's length ever holds more than the
-- limit, and a spend stops counting within one bucket after it is a span old.
-- One SELECT of one row, nothing less stable than its declaration: a query calling it
-- inlines it. The grain, span and step come from a subquery kept apart (OFFSET 0), so that
-- tokens_bucket is handed columns and inlines too: handed the CASE that makes the grain (an
-- argument it reads more than once), it stayed a called SQL function, some 8 us a call.
    SELECT w.grain, tokens_bucket(w.grain, p_now) - w.span, tokens_bucket(w.grain, p_now),
           w.span + w.step
    FROM (
        SELECT CASE WHEN p_rolling THEN CAST(r.step_s AS text) || 's'
                    WHEN p_period IN ('week', 'month') THEN p_period
                    ELSE CAST(r.span_s AS text) || 's' END AS grain,
               CASE WHEN p_rolling THEN make_interval(secs => r.span_s)
                    ELSE interval '0' END AS span,
               CASE WHEN p_rolling THEN make_interval(secs => r.step_s)
                    WHEN p_period = 'month' THEN interval '1 month'
                    ELSE make_interval(secs => r.span_s) END AS step
        FROM (SELECT CASE p_period WHEN 'minute' THEN 60 WHEN 'hour' THEN 3600
                                   WHEN 'day' THEN 86400 WHEN 'week' THEN 604800
                                   ELSE 2592000 END AS span_s,
                     CASE p_period WHEN 'minute' THEN 1 WHEN 'hour' THEN 60
                                   WHEN 'day' THEN 900 WHEN 'week' THEN 7200
                                   ELSE 21600 END AS step_s) r
        OFFSET 0
    ) w
$fn$;
