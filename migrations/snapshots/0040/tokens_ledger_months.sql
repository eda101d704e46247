CREATE OR REPLACE FUNCTION tokens_ledger_months(p_until timestamptz) RETURNS text[]
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = public, pg_temp SET lock_timeout = '5s' AS $fn$
-- Make the ledger's monthly partitions (ledger_entries and entry_grants, by created_at, UTC
-- months) and the events' (by at) from the newest one's end up to the one holding p_until; the
-- suffixes made (YYYY_MM).
-- The worker calls it as it starts and beat daily, three months ahead. Past the newest month the
-- partition `after` holds everything (up to MAXVALUE, so an entry stamped by a clock far ahead
-- is written, never refused): it is detached, the months are made, and it is attached again
-- behind them. There is no default partition, so the ranges cover every instant in order and a
-- read of a user's newest entries walks the months newest first and stops (with a default
-- partition it would probe every month).
-- Entries in `after` (rare: a clock far ahead) are moved into their months: taken out with their
-- splits and refund caps, put back through the parents once the months exist, with the chain's
-- and the events' triggers off (same rows, same hashes; their events were written already, and
-- are moved the same way, with their ids and places).
-- The detach locks the parents for a moment, once a month: lock_timeout bounds the wait behind a
-- long transaction (the next day's call makes what this one could not).
-- SECURITY DEFINER: partitions belong to the tables' owner (tokens_ledger_partition).
DECLARE
    v_from timestamptz;
    v_to timestamptz;
    v_end timestamptz;
    v_month text;
    v_moving boolean;
    made text[] := '{}';
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('tokens_ledger_months'));
    SELECT max(p.upper) INTO v_from FROM tokens_ledger_partitions() p;
    v_end := v_from;
    WHILE v_end <= p_until LOOP
        v_end := (v_end AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC';
    END LOOP;
    IF v_end = v_from THEN
        RETURN made;
    END IF;
    v_moving := EXISTS (SELECT 1 FROM ledger_entries_after) OR EXISTS (SELECT 1 FROM events_after);
    -- Every table the months change, locked at once in the order a movement takes them.
    LOCK TABLE refund_totals, ledger_entries, events, entry_grants IN ACCESS EXCLUSIVE MODE;
    IF v_moving THEN
        CREATE TEMP TABLE tokens_moving_entries ON COMMIT DROP AS
            SELECT * FROM ledger_entries_after;
        CREATE TEMP TABLE tokens_moving_splits ON COMMIT DROP AS
            SELECT * FROM entry_grants_after;
        CREATE TEMP TABLE tokens_moving_caps ON COMMIT DROP AS
            SELECT t.* FROM refund_totals t JOIN ledger_entries_after e
            ON e.id = t.entry_id AND e.created_at = t.entry_created_at;
        CREATE TEMP TABLE tokens_moving_events ON COMMIT DROP AS SELECT * FROM events_after;
        DELETE FROM ledger_entries_after;  -- their splits and caps with them (ON DELETE CASCADE)
        DELETE FROM events_after;
    END IF;
    ALTER TABLE events DETACH PARTITION events_after;
    ALTER TABLE entry_grants DETACH PARTITION entry_grants_after;
    ALTER TABLE ledger_entries DETACH PARTITION ledger_entries_after;
    WHILE v_from < v_end LOOP
        v_to := (v_from AT TIME ZONE 'UTC' + interval '1 month') AT TIME ZONE 'UTC';
        v_month := to_char(v_from AT TIME ZONE 'UTC', 'YYYY_MM');
        PERFORM tokens_ledger_partition(v_month, format('FROM (%L) TO (%L)', v_from, v_to));
        PERFORM tokens_events_partition(v_month, format('FROM (%L) TO (%L)', v_from, v_to));
        made := made || v_month;
        v_from := v_to;
    END LOOP;
    EXECUTE format('ALTER TABLE ledger_entries ATTACH PARTITION ledger_entries_after'
                   ' FOR VALUES FROM (%L) TO (MAXVALUE)', v_end);
    EXECUTE format('ALTER TABLE entry_grants ATTACH PARTITION entry_grants_after'
                   ' FOR VALUES FROM (%L) TO (MAXVALUE)', v_end);
    EXECUTE format('ALTER TABLE events ATTACH PARTITION events_after'
                   ' FOR VALUES FROM (%L) TO (MAXVALUE)', v_end);
    IF v_moving THEN
        ALTER TABLE ledger_entries DISABLE TRIGGER tokens_chain;
        ALTER TABLE ledger_entries DISABLE TRIGGER tokens_entry_event;
        INSERT INTO ledger_entries SELECT * FROM tokens_moving_entries;
        INSERT INTO entry_grants SELECT * FROM tokens_moving_splits;
        INSERT INTO refund_totals SELECT * FROM tokens_moving_caps;
        INSERT INTO events SELECT * FROM tokens_moving_events;
        ALTER TABLE ledger_entries ENABLE TRIGGER tokens_chain;
        ALTER TABLE ledger_entries ENABLE TRIGGER tokens_entry_event;
    END IF;
    RETURN made;
END
$fn$;
