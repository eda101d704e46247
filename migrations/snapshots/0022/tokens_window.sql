CREATE OR REPLACE FUNCTION tokens_window(
    p_period text, p_rolling boolean, p_now timestamptz,
    OUT grain text, OUT lo timestamptz, OUT hi timestamptz, OUT leaves interval
) LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
-- A limit's window at p_now, as the buckets (tokens_bucket) it sums: those starting from lo to
-- hi. A spend leaves the window once p_now reaches its bucket's start + leaves.
-- Calendar: one bucket, the UTC minute, hour, day, week (from Monday) or month holding p_now.
-- Rolling (the last 60 s, 1 h, 24 h, 7 days, 30 days): buckets of a sixtieth to a hundred and
-- twentieth of the span (1 s, 1 min, 15 min, 2 h, 6 h), the current one and every one that
-- started within the span before it. So every spend of the last span is counted (none is
-- older than span + one bucket): no interval of the span's length ever holds more than the
-- limit, and a spend stops counting within one bucket after it is a span old.
    SELECT w.grain, tokens_bucket(w.grain, p_now) - w.span, tokens_bucket(w.grain, p_now),
           w.span + w.step
    FROM (
        SELECT CASE p_period
                   WHEN 'minute' THEN '60s' WHEN 'hour' THEN '3600s' WHEN 'day' THEN '86400s'
                   ELSE p_period END AS grain,
               interval '0' AS span,
               CASE p_period WHEN 'minute' THEN interval '1 minute'
                             WHEN 'hour' THEN interval '1 hour'
                             WHEN 'day' THEN interval '1 day'
                             WHEN 'week' THEN interval '7 days'
                             ELSE interval '1 month' END AS step
        WHERE NOT p_rolling
        UNION ALL
        SELECT r.step_s || 's', make_interval(secs => r.span_s), make_interval(secs => r.step_s)
        FROM (SELECT CASE p_period WHEN 'minute' THEN 60 WHEN 'hour' THEN 3600
                                   WHEN 'day' THEN 86400 WHEN 'week' THEN 604800
                                   ELSE 2592000 END AS span_s,
                     CASE p_period WHEN 'minute' THEN 1 WHEN 'hour' THEN 60
                                   WHEN 'day' THEN 900 WHEN 'week' THEN 7200
                                   ELSE 21600 END AS step_s) r
        WHERE p_rolling
    ) w
$fn$;
