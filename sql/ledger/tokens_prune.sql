CREATE OR REPLACE FUNCTION tokens_prune(
    p_after text, p_size integer, p_cutoff timestamptz, p_older_than text,
    OUT users text[], OUT deleted bigint
) LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = public, pg_temp AS $fn$
-- Prune the next p_size users (in user id order, after p_after) who have entries created before
-- p_cutoff: each keeps one carried_forward entry for the sum removed (an earlier one is folded
-- in) whose split is the removed entries' splits summed per grant, so balances equal their
-- ledger and grants their splits. Their removed entries' own splits and refund caps go with
-- them (ON DELETE CASCADE). users: who was pruned (none: the prune is done); deleted: the
-- entries removed, earlier carried_forward entries not counted. The carried_forward entry is
-- its user's chain checkpoint: prev_hash zeros, hash the last replaced entry's (tokens_chain).
-- SECURITY DEFINER: it runs as the tables' owner, the one way the worker's role (which may never
-- UPDATE or DELETE a ledger entry, migration 0026) removes entries.
--
-- The accounts are locked first, in user id order as every movement locks them; the prune is a
-- statement of its own after the lock, with a snapshot taken once they are held: nothing moves
-- a user's money while their history is rewritten, a refund of an entry being pruned waits and
-- then finds it gone, and a second prune reads (and folds) the first one's carried_forward.
BEGIN
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
    WITH gone AS (
        DELETE FROM ledger_entries
        WHERE user_id = ANY(users) AND created_at < p_cutoff
        RETURNING id, user_id, kind, tokens_amount, metadata, created_at, hash
    ), carried AS (
        INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount,
                                    balance_before, balance_after, metadata, created_at,
                                    prev_hash, hash)
        SELECT g.user_id, 'carried_forward', 'carried_forward', sum(g.tokens_amount),
               0, sum(g.tokens_amount),
               jsonb_build_object(
                   'entries', sum(CASE WHEN g.kind = 'carried_forward'
                                       THEN coalesce((g.metadata->>'entries')::bigint, 1)
                                       ELSE 1 END),
                   'older_than', p_older_than),
               max(g.created_at),
               repeat('0', 64), (array_agg(g.hash ORDER BY g.created_at DESC, g.id DESC))[1]
        FROM gone g GROUP BY g.user_id
        RETURNING id, user_id
    ), split AS (
        INSERT INTO entry_grants (entry_id, grant_id, amount, seq)
        SELECT c.id, s.grant_id, s.amount,
               CAST(row_number() OVER (PARTITION BY c.id ORDER BY s.grant_id) - 1 AS integer)
        FROM (
            SELECT g.user_id, eg.grant_id, sum(eg.amount) AS amount
            FROM entry_grants eg JOIN gone g ON g.id = eg.entry_id
            GROUP BY g.user_id, eg.grant_id
            HAVING sum(eg.amount) <> 0
        ) s JOIN carried c ON c.user_id = s.user_id
        RETURNING 1
    )
    SELECT count(*) INTO deleted FROM gone g WHERE g.kind <> 'carried_forward';
END
$fn$;
