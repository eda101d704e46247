CREATE OR REPLACE FUNCTION tokens_prune_event_months(
    p_cutoff timestamptz, p_celery_pos bigint, p_webhook boolean,
    OUT dropped text[], OUT deleted bigint
) LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = public, pg_temp SET lock_timeout = '2s' AS $fn$
-- events.prune's first step: the events' partitions wholly before p_cutoff (and now) whose every
-- event the prune may remove (tokens_event_done) are dropped whole instead of deleted row by
-- row, oldest first up to the first one still holding an event to keep, and an empty `before`
-- is made in their place. dropped: the partitions; deleted: the events they held.
-- The partitions are read without a lock: no event is written into a month before the cutoff
-- (an event's `at` is its change's time), and an event that is done stays done. Only the drop
-- takes ACCESS EXCLUSIVE on events, for a moment; lock_timeout bounds the wait behind a long
-- transaction, and then nothing is dropped (the row by row prune does it all).
-- SECURITY DEFINER: partitions belong to the table's owner; the worker's role may not drop them.
DECLARE
    p record;
    v_count bigint;
    v_done boolean;
    v_bound timestamptz;
    v_parts text[] := '{}';
    v_part text;
BEGIN
    dropped := '{}';
    deleted := 0;
    PERFORM pg_advisory_xact_lock(hashtext('tokens_prune_event_months'));
    FOR p IN
        SELECT t.name, t.upper FROM tokens_partitions('events') t
        WHERE t.upper <= p_cutoff AND t.upper < now() ORDER BY t.upper
    LOOP
        EXECUTE format('SELECT count(*), coalesce(bool_and(tokens_event_done(e, $1, $2, $3)), true)'
                       ' FROM %I e', p.name)
        INTO v_count, v_done USING p_cutoff, p_celery_pos, p_webhook;
        EXIT WHEN NOT v_done;
        v_parts := v_parts || p.name;
        v_bound := p.upper;
        deleted := deleted + v_count;
    END LOOP;
    IF v_bound IS NULL THEN
        deleted := 0;
        RETURN;
    END IF;
    BEGIN
        LOCK TABLE events IN ACCESS EXCLUSIVE MODE;
        FOREACH v_part IN ARRAY v_parts LOOP
            EXECUTE format('ALTER TABLE events DETACH PARTITION %I', v_part);
            EXECUTE format('DROP TABLE %I', v_part);
        END LOOP;
        -- `before` again, empty, from MINVALUE: the ranges keep covering every instant.
        PERFORM tokens_events_partition('before', format('FROM (MINVALUE) TO (%L)', v_bound));
        dropped := v_parts;
    EXCEPTION WHEN lock_not_available THEN
        deleted := 0;
    END;
END
$fn$;
