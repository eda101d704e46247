CREATE OR REPLACE FUNCTION tokens_set_alerts(
    p_user text, p_thresholds bigint[], p_set_topup boolean, p_below bigint, p_amount bigint,
    p_max_per_month integer,
    OUT status text, OUT thresholds bigint[], OUT topup jsonb, OUT pool text
) LANGUAGE plpgsql VOLATILE AS $fn$
-- tokens.set_alerts (p_thresholds not NULL) and tokens.set_auto_topup (p_set_topup; p_below
-- NULL turns it off), under the account's lock: from now on crossings are counted from the
-- available tokens as they are now (setting a threshold is not a crossing). status: 'ok',
-- 'not_found', or 'member' (a pool's member: alerts belong to the pool, named in pool). A
-- top-up's outstanding request and the month's count survive a change of its settings.
#variable_conflict use_column
DECLARE
    v_avail bigint;
    w event_alerts%ROWTYPE;
BEGIN
    SELECT a.tokens_balance - a.tokens_reserved, a.pool_id INTO v_avail, pool
    FROM accounts a WHERE a.user_id = p_user FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        status := 'not_found';
        RETURN;
    END IF;
    IF pool IS NOT NULL THEN
        status := 'member';
        RETURN;
    END IF;
    INSERT INTO event_alerts AS e (user_id, available) VALUES (p_user, v_avail)
    ON CONFLICT (user_id) DO UPDATE SET available = v_avail;
    IF p_thresholds IS NOT NULL THEN
        UPDATE event_alerts SET thresholds = ARRAY(
            SELECT DISTINCT x FROM unnest(p_thresholds) x ORDER BY x)
        WHERE user_id = p_user;
    END IF;
    IF p_set_topup THEN
        UPDATE event_alerts SET topup_below = p_below,
            topup_amount = CASE WHEN p_below IS NULL THEN NULL ELSE p_amount END,
            topup_max_per_month = CASE WHEN p_below IS NULL THEN NULL ELSE p_max_per_month END
        WHERE user_id = p_user;
    END IF;
    SELECT * INTO w FROM event_alerts WHERE user_id = p_user;
    UPDATE accounts SET watched = (cardinality(w.thresholds) > 0 OR w.topup_below IS NOT NULL)
    WHERE user_id = p_user;
    status := 'ok';
    thresholds := w.thresholds;
    topup := CASE WHEN w.topup_below IS NULL THEN NULL ELSE jsonb_build_object(
        'below', w.topup_below, 'amount', w.topup_amount,
        'max_per_month', w.topup_max_per_month) END;
END
$fn$;
