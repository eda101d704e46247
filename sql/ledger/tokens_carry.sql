CREATE OR REPLACE FUNCTION tokens_carry(
    p_users text[], p_cutoff timestamptz, p_older_than text, p_dropping timestamptz
) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $fn$
-- The prune's rewrite of history, for tokens_prune and tokens_prune_months: the entries of
-- p_users (NULL: everyone) created before p_cutoff are replaced, per user, by one
-- carried_forward entry for their sum (an earlier one is folded in) whose split is theirs
-- summed per grant, so balances equal their ledger and grants their splits. Entries before
-- p_dropping (NULL: none) are only read: they sit in partitions the caller drops, and their
-- checkpoint is dated p_dropping, the first instant of the months kept; the others are deleted
-- (their splits and refund caps go with them, ON DELETE CASCADE) and the checkpoint keeps the
-- last one's date. The checkpoint's prev_hash is zeros and its hash the last replaced entry's
-- (tokens_chain). Returns the entries replaced, earlier carried_forward entries not counted.
DECLARE
    replaced bigint;
BEGIN
    WITH deleted AS (
        DELETE FROM ledger_entries
        WHERE (p_users IS NULL OR user_id = ANY(p_users)) AND created_at < p_cutoff
          AND (p_dropping IS NULL OR created_at >= p_dropping)
        RETURNING id, user_id, kind, tokens_amount, metadata, created_at, hash
    ), gone AS (
        SELECT * FROM deleted
        UNION ALL
        SELECT e.id, e.user_id, e.kind, e.tokens_amount, e.metadata, e.created_at, e.hash
        FROM ledger_entries e
        WHERE (p_users IS NULL OR e.user_id = ANY(p_users)) AND e.created_at < p_dropping
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
               coalesce(p_dropping, max(g.created_at)),
               repeat('0', 64), (array_agg(g.hash ORDER BY g.created_at DESC, g.id DESC))[1]
        FROM gone g GROUP BY g.user_id
        RETURNING id, user_id, created_at
    ), split AS (
        INSERT INTO entry_grants (entry_id, grant_id, amount, seq, created_at)
        SELECT c.id, s.grant_id, s.amount,
               CAST(row_number() OVER (PARTITION BY c.id ORDER BY s.grant_id) - 1 AS integer),
               c.created_at
        FROM (
            SELECT g.user_id, eg.grant_id, sum(eg.amount) AS amount
            FROM entry_grants eg JOIN gone g ON g.id = eg.entry_id AND g.created_at = eg.created_at
            GROUP BY g.user_id, eg.grant_id
            HAVING sum(eg.amount) <> 0
        ) s JOIN carried c ON c.user_id = s.user_id
        RETURNING 1
    )
    SELECT count(*) INTO replaced FROM gone g WHERE g.kind <> 'carried_forward';
    RETURN replaced;
END
$fn$;
