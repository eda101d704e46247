CREATE OR REPLACE FUNCTION tokens_ledger_private(p_suffix text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = public, pg_temp AS $fn$
-- The worker's role has no right on the ledger's partition p_suffix (of both tables): it goes
-- through the parents. New tables take the migrating role's default privileges (migration
-- 0026), which would let it UPDATE or DELETE a partition named directly.
BEGIN
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tokens_worker') THEN
        EXECUTE format('REVOKE ALL ON %I, %I FROM tokens_worker',
                       'ledger_entries_' || p_suffix, 'entry_grants_' || p_suffix);
    END IF;
END
$fn$;
