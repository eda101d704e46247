-- What each grant's remaining is not yet accounted for by its entries' splits, put on the first
-- entry (created_at, id) of its user: the history before splits were kept, or before a prune
-- that dropped them. A user with no entry keeps the difference, and reconcile names the grant.
INSERT INTO entry_grants (entry_id, grant_id, amount, seq)
SELECT x.first_entry, x.grant_id, x.missing,
       1000000 + CAST(row_number() OVER (PARTITION BY x.first_entry ORDER BY x.grant_id)
                      AS integer)
FROM (
    SELECT m.grant_id, m.missing,
           (SELECT e.id FROM ledger_entries e WHERE e.user_id = m.user_id
            ORDER BY e.created_at, e.id LIMIT 1) AS first_entry
    FROM (
        SELECT g.id AS grant_id, g.user_id,
               g.remaining - COALESCE((SELECT SUM(eg.amount) FROM entry_grants eg
                                       WHERE eg.grant_id = g.id), 0) AS missing
        FROM grants g
    ) m
    WHERE m.missing <> 0
) x
WHERE x.first_entry IS NOT NULL
ON CONFLICT (entry_id, grant_id) DO UPDATE SET amount = entry_grants.amount + excluded.amount
