CREATE OR REPLACE FUNCTION tokens_ledger_partition(p_suffix text, p_bounds text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = public, pg_temp AS $fn$
-- The ledger's partition p_suffix FOR VALUES p_bounds, of both tables (entry_grants has the
-- months of ledger_entries under the same suffixes). The worker's role gets no right on it: it
-- goes through the parents. A new table takes the migrating role's default privileges
-- (migration 0026), which would let it UPDATE or DELETE a partition named directly.
BEGIN
    EXECUTE format('CREATE TABLE %I PARTITION OF ledger_entries FOR VALUES %s',
                   'ledger_entries_' || p_suffix, p_bounds);
    EXECUTE format('CREATE TABLE %I PARTITION OF entry_grants FOR VALUES %s',
                   'entry_grants_' || p_suffix, p_bounds);
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tokens_worker') THEN
        EXECUTE format('REVOKE ALL ON %I, %I FROM tokens_worker',
                       'ledger_entries_' || p_suffix, 'entry_grants_' || p_suffix);
    END IF;
END
$fn$;
