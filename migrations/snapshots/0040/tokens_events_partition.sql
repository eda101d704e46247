CREATE OR REPLACE FUNCTION tokens_events_partition(p_suffix text, p_bounds text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = public, pg_temp AS $fn$
-- The events' partition p_suffix FOR VALUES p_bounds (by `at`; the ledger's months under the
-- same suffixes, made with them by tokens_ledger_months). As for the ledger's partitions
-- (tokens_ledger_partition), the worker's role gets no right on it: it goes through the parent.
BEGIN
    EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES %s',
                   'events_' || p_suffix, p_bounds);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tokens_worker') THEN
        EXECUTE format('REVOKE ALL ON %I FROM tokens_worker', 'events_' || p_suffix);
    END IF;
END
$fn$;
