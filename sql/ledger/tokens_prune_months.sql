CREATE OR REPLACE FUNCTION tokens_prune_months(
    p_cutoff timestamptz, p_older_than text, OUT dropped text[], OUT deleted bigint
) LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = public, pg_temp SET lock_timeout = '2s' AS $fn$
-- The prune's first step: the ledger's partitions wholly before p_cutoff (and before now) are
-- dropped whole, with their months of entry_grants, instead of deleted entry by entry (and an
-- empty `before` is made in their place, up to the first month kept). In one
-- transaction, every user with entries there gets their carried_forward checkpoint, dated the
-- first instant kept (tokens_carry), and then the partitions go: readers see the old entries or
-- the checkpoint, never both. dropped: the partitions' names; deleted: the entries they held,
-- earlier carried_forward entries not counted. tokens_prune then removes what is left before
-- the cutoff entry by entry.
--
-- No account is locked: a movement writes entries now, never in a month being dropped, and the
-- checkpoint carries the last old entry's hash, which is what a new entry chains from either
-- way. The checkpoint must come first in its user's order, so a month boundary an entry sits on
-- exactly is not used (the one before it is). Dropping takes ACCESS EXCLUSIVE on refund_totals,
-- ledger_entries and entry_grants, in the order a refund takes them, for the moment of the
-- drop; lock_timeout bounds the wait behind a long transaction, and then nothing is dropped
-- (the entry by entry prune does it all).
DECLARE
    v_bound timestamptz;
    v_part text;
BEGIN
    dropped := '{}';
    deleted := 0;
    PERFORM pg_advisory_xact_lock(hashtext('tokens_prune'));
    SELECT p.upper INTO v_bound FROM tokens_ledger_partitions() p
    WHERE p.upper <= p_cutoff AND p.upper < now()
      AND NOT EXISTS (SELECT 1 FROM ledger_entries e WHERE e.created_at = p.upper)
    ORDER BY p.upper DESC LIMIT 1;
    IF v_bound IS NULL THEN
        RETURN;
    END IF;
    BEGIN
        deleted := tokens_carry(NULL, v_bound, p_older_than, v_bound);
        LOCK TABLE refund_totals, ledger_entries, entry_grants IN ACCESS EXCLUSIVE MODE;
        DELETE FROM refund_totals WHERE entry_created_at < v_bound;
        FOR v_part IN SELECT p.name FROM tokens_ledger_partitions() p WHERE p.upper <= v_bound
        LOOP
            EXECUTE format('ALTER TABLE entry_grants DETACH PARTITION %I',
                           replace(v_part, 'ledger_entries_', 'entry_grants_'));
            EXECUTE format('DROP TABLE %I', replace(v_part, 'ledger_entries_', 'entry_grants_'));
            EXECUTE format('ALTER TABLE ledger_entries DETACH PARTITION %I', v_part);
            EXECUTE format('DROP TABLE %I', v_part);
            dropped := dropped || v_part;
        END LOOP;
        -- `before` again, empty, from MINVALUE: the ranges keep covering every instant, so a
        -- user's newest entries are still read months newest first (tokens_ledger_months).
        PERFORM tokens_ledger_partition('before', format('FROM (MINVALUE) TO (%L)', v_bound));
    EXCEPTION WHEN lock_not_available THEN
        dropped := '{}';
        deleted := 0;
    END;
END
$fn$;
