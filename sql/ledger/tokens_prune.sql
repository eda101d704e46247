CREATE OR REPLACE FUNCTION tokens_prune(
    p_after text, p_size integer, p_cutoff timestamptz, p_older_than text,
    OUT users text[], OUT deleted bigint
) LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $fn$
-- Prune the next p_size users (in user id order, after p_after) who have entries created before
-- p_cutoff, entry by entry: each keeps one carried_forward entry for what was removed
-- (tokens_carry). users: who was pruned (none: the prune is done); deleted: the entries
-- removed, earlier carried_forward entries not counted. tokens_prune_months has dropped the
-- months wholly before the cutoff first, where it could.
-- SECURITY DEFINER: it runs as the tables' owner, the one way the worker's role (which may never
-- UPDATE or DELETE a ledger entry, migration 0026) removes entries.
--
-- The accounts are locked first, in user id order as every movement locks them; the prune is a
-- statement of its own after the lock, with a snapshot taken once they are held: nothing moves
-- a user's money while their history is rewritten, a refund of an entry being pruned waits and
-- then finds it gone, and a second prune reads (and folds) the first one's carried_forward.
BEGIN
    -- One prune at a time (tokens_prune_months takes it too): each rewrites whole histories.
    PERFORM pg_advisory_xact_lock(hashtext('tokens_prune'));
    SELECT coalesce(array_agg(l.user_id ORDER BY l.user_id), '{}') INTO users
    FROM (
        SELECT a.user_id FROM accounts a
        WHERE a.user_id IN (
            SELECT DISTINCT e.user_id FROM ledger_entries e
            WHERE e.created_at < p_cutoff AND e.kind <> 'carried_forward'
              AND (p_after IS NULL OR e.user_id > p_after)
            ORDER BY e.user_id
            LIMIT p_size)
        ORDER BY a.user_id
        FOR UPDATE
    ) l;
    deleted := 0;
    IF cardinality(users) = 0 THEN
        RETURN;
    END IF;
    deleted := tokens_carry(users, p_cutoff, p_older_than, NULL);
END
$fn$;
