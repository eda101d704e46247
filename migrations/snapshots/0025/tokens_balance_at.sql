CREATE OR REPLACE FUNCTION tokens_balance_at(
    p_user text, p_at timestamptz,
    OUT found boolean, OUT balance bigint, OUT reserved bigint, OUT spent bigint,
    OUT pruned_before timestamptz
) LANGUAGE sql STABLE AS $fn$
-- The balance fields as they were at p_at: the balance the ledger said then (the last entry at
-- or before it, in the contract's order; the pool's for a member), the reserved tokens then (the
-- pool's) and the account's own tokens_spent then (tokens_history), 0 before any. pruned_before:
-- set when p_at is before the carried_forward checkpoint a prune left, whose history is gone.
-- found: false for an unknown account. Each part is one index probe.
SELECT true,
       coalesce((SELECT e.balance_after FROM ledger_entries e
                 WHERE e.user_id = a.pool AND e.created_at <= p_at
                 ORDER BY e.created_at DESC, e.id DESC LIMIT 1), 0),
       coalesce((SELECT h.reserved FROM account_history h
                 WHERE h.user_id = a.pool AND h.at <= p_at
                 ORDER BY h.at DESC, h.id DESC LIMIT 1), 0),
       coalesce((SELECT h.spent FROM account_history h
                 WHERE h.user_id = p_user AND h.at <= p_at
                 ORDER BY h.at DESC, h.id DESC LIMIT 1), 0),
       (SELECT f.created_at FROM (
            SELECT e.kind, e.created_at FROM ledger_entries e WHERE e.user_id = a.pool
            ORDER BY e.created_at, e.id LIMIT 1) f
        WHERE f.kind = 'carried_forward' AND p_at < f.created_at)
FROM (SELECT CAST(coalesce(x.pool_id, x.user_id) AS text) AS pool
      FROM accounts x WHERE x.user_id = p_user) a
UNION ALL
SELECT false, 0, 0, 0, NULL
WHERE NOT EXISTS (SELECT 1 FROM accounts x WHERE x.user_id = p_user)
$fn$;
