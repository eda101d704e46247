CREATE OR REPLACE FUNCTION tokens_set_limit(
    p_user text, p_name text, p_max bigint, p_period text, p_rolling boolean,
    OUT status text, OUT limits jsonb
) LANGUAGE plpgsql VOLATILE AS $fn$
-- Set (p_max NULL: remove) the limit p_name of p_user, under its pool's lock (tokens_lock:
-- the lock every movement of the tree takes first), so no movement counts meanwhile. When no
-- limit of p_user read buckets of the limit's width as far back as its window starts, they
-- are made from the ledger over its window: spends made before it was set count too (debits,
-- charges and captures of p_user and the accounts below it, less what was refunded of each).
-- When one did, they are complete (made so, then counted by every movement) and stay: counted
-- again they would forget what entries ledger.delete_old_entries removed had spent in the
-- window. Buckets of widths no limit of p_user reads any more go. limits: the account's limits
-- as listed (tokens_limits). status: 'ok', 'not_found' or 'too_many' (a ninth limit).
#variable_conflict use_column
DECLARE
    v_pool text;
    v_now timestamptz;
    v_grain text;
    v_lo timestamptz;
    v_counted boolean;
BEGIN
    SELECT l.pool, l.moment INTO v_pool, v_now FROM tokens_lock(p_user) l;
    IF v_now IS NULL THEN
        status := 'not_found';
        RETURN;
    END IF;
    IF p_max IS NULL THEN
        DELETE FROM spend_limits l WHERE l.user_id = p_user AND l.name = p_name;
    ELSE
        IF NOT EXISTS (SELECT 1 FROM spend_limits l WHERE l.user_id = p_user AND l.name = p_name)
           AND (SELECT count(*) FROM spend_limits l WHERE l.user_id = p_user) >= 8 THEN
            status := 'too_many';
            RETURN;
        END IF;
        SELECT w.grain, w.lo INTO v_grain, v_lo FROM tokens_window(p_period, p_rolling, v_now) w;
        SELECT EXISTS (
            SELECT 1 FROM spend_limits l
            CROSS JOIN LATERAL tokens_window(l.period, l.rolling, v_now) w
            WHERE l.user_id = p_user AND w.grain = v_grain AND w.lo <= v_lo) INTO v_counted;
        INSERT INTO spend_limits AS l (user_id, name, max_tokens, period, rolling, created_at)
        VALUES (p_user, p_name, p_max, p_period, p_rolling, v_now)
        ON CONFLICT (user_id, name) DO UPDATE
        SET max_tokens = p_max, period = p_period, rolling = p_rolling;
    END IF;
    IF p_max IS NOT NULL AND NOT v_counted THEN
        SELECT min(w.lo) INTO v_lo
        FROM spend_limits l CROSS JOIN LATERAL tokens_window(l.period, l.rolling, v_now) w
        WHERE l.user_id = p_user AND w.grain = v_grain;
        DELETE FROM limit_buckets b WHERE b.user_id = p_user AND b.grain = v_grain;
        INSERT INTO limit_buckets (user_id, grain, bucket, tokens)
        SELECT p_user, v_grain, tokens_bucket(v_grain, e.created_at),
               sum(-e.tokens_amount - coalesce(t.refunded, 0))
        FROM ledger_entries e
        LEFT JOIN refund_totals t ON t.entry_id = e.id
        WHERE e.user_id = v_pool AND e.kind IN ('debit', 'charge', 'capture')
          AND e.created_at >= v_lo
          AND (p_user = v_pool OR EXISTS (
              SELECT 1 FROM accounts s WHERE s.user_id = e.spent_by
                AND (s.user_id = p_user OR s.parent_id = p_user)))
        GROUP BY 3
        HAVING sum(-e.tokens_amount - coalesce(t.refunded, 0)) <> 0;
    END IF;
    DELETE FROM limit_buckets b
    WHERE b.user_id = p_user AND b.grain NOT IN (
        SELECT w.grain FROM spend_limits l
        CROSS JOIN LATERAL tokens_window(l.period, l.rolling, v_now) w
        WHERE l.user_id = p_user);
    UPDATE accounts a SET limited = EXISTS (
        SELECT 1 FROM spend_limits l JOIN accounts m ON m.user_id = l.user_id
        WHERE coalesce(m.pool_id, m.user_id) = v_pool)
    WHERE a.user_id = v_pool;
    SELECT coalesce(jsonb_agg(l.listed ORDER BY l.n), '[]') INTO limits
    FROM tokens_limits(p_user, v_now) WITH ORDINALITY
         AS l(user_id, name, max_tokens, used, grain, lo, refuses, listed, n)
    WHERE l.user_id = p_user;
    status := 'ok';
END
$fn$;
