CREATE OR REPLACE FUNCTION tokens_events_number(p_max integer) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $fn$
-- Gives committed events their place in the one global order (events.pos), after their commit:
-- the outbox gap closed. A transaction's events are invisible here until it commits, and only
-- then are they numbered, after every number already given; numbering runs one transaction at
-- a time (the event_positions row is its lock, released only once that transaction is visible),
-- so the numbered events always form a prefix that only grows at its end: a reader that pages
-- by pos never passes an event that a later number could still land behind. Per user, seq
-- order is commit order (tokens_event), and each pass numbers in id order, which for one user
-- is seq order. Returns how many it numbered (0 as well when another transaction is numbering:
-- its numbers will be visible when it commits). Run in a transaction of its own.
DECLARE
    v_last bigint;
    v_count bigint;
BEGIN
    SELECT last INTO v_last FROM event_positions WHERE id = 1 FOR UPDATE SKIP LOCKED;
    IF v_last IS NULL THEN
        RETURN 0;
    END IF;
    WITH todo AS (
        SELECT e.id, v_last + row_number() OVER (ORDER BY e.id) AS pos
        FROM (SELECT id FROM events WHERE pos IS NULL ORDER BY id LIMIT p_max) e
    )
    UPDATE events SET pos = todo.pos FROM todo WHERE events.id = todo.id;
    GET DIAGNOSTICS v_count = ROW_COUNT;
    IF v_count > 0 THEN
        UPDATE event_positions SET last = v_last + v_count WHERE id = 1;
    END IF;
    RETURN v_count;
END
$fn$;
