CREATE OR REPLACE FUNCTION tokens_alerts(p_user text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $fn$
-- The alerts' one decision, run at the commit of a transaction that changed the account's
-- tokens_available (balance - reserved), under the account's lock (the change holds it): the
-- available now against the available the last decision saw (event_alerts.available, the
-- previous commit's), so each crossing of a threshold gives exactly one event however the
-- changes interleave, and a transaction that goes down and back up (a reset renewal's expiry
-- and allowance) crosses nothing. Then the auto top-up: a request fulfilled by an entry carrying
-- its key, or older than 24 h, is no longer outstanding; with none outstanding, available below
-- `below` and the month's count under its cap, a new request with a fresh key.
DECLARE
    w event_alerts%ROWTYPE;
    v_avail bigint;
    v_now timestamptz;
    v_month timestamptz;
    t bigint;
BEGIN
    SELECT * INTO w FROM event_alerts WHERE user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT a.tokens_balance - a.tokens_reserved, a.updated_at INTO v_avail, v_now
    FROM accounts a WHERE a.user_id = p_user;
    IF v_avail < w.available THEN
        FOR t IN SELECT x FROM unnest(w.thresholds) x
                 WHERE w.available >= x AND v_avail < x ORDER BY x DESC LOOP
            PERFORM tokens_event(p_user, 'balance.low',
                jsonb_build_object('threshold', t, 'tokens_available', v_avail), v_now);
        END LOOP;
    ELSIF v_avail > w.available THEN
        FOR t IN SELECT x FROM unnest(w.thresholds) x
                 WHERE w.available < x AND v_avail >= x ORDER BY x LOOP
            PERFORM tokens_event(p_user, 'balance.recovered',
                jsonb_build_object('threshold', t, 'tokens_available', v_avail), v_now);
        END LOOP;
    END IF;
    IF w.topup_key IS NOT NULL AND (
        w.topup_requested_at + interval '24 hours' <= v_now
        OR EXISTS (SELECT 1 FROM ledger_entries e
                   WHERE e.user_id = p_user AND e.idempotency_key = w.topup_key
                     AND e.created_at >= w.topup_requested_at AND e.tokens_amount > 0)
    ) THEN
        w.topup_key := NULL;
    END IF;
    IF w.topup_below IS NOT NULL AND v_avail < w.topup_below AND w.topup_key IS NULL THEN
        v_month := date_trunc('month', v_now AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
        IF w.topup_month IS DISTINCT FROM v_month THEN
            w.topup_month := v_month;
            w.topup_count := 0;
        END IF;
        IF w.topup_max_per_month IS NULL OR w.topup_count < w.topup_max_per_month THEN
            w.topup_key := 'topup-' || gen_random_uuid()::text;
            w.topup_requested_at := v_now;
            w.topup_count := w.topup_count + 1;
            PERFORM tokens_event(p_user, 'topup.requested',
                jsonb_build_object('amount', w.topup_amount, 'idempotency_key', w.topup_key,
                                   'requested_at', tokens_iso(v_now)), v_now);
        END IF;
    END IF;
    UPDATE event_alerts SET available = v_avail, topup_key = w.topup_key,
        topup_requested_at = w.topup_requested_at, topup_month = w.topup_month,
        topup_count = w.topup_count
    WHERE user_id = p_user;
END
$fn$;
