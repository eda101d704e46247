CREATE OR REPLACE FUNCTION tokens_chain_backfill(p_after text, p_users integer) RETURNS text
LANGUAGE plpgsql VOLATILE AS $fn$
-- Chains the entries written before the chain existed, for the next p_users users after
-- p_after (in user id order), in the contract's order; returns the last user done (NULL: none
-- left). Their accounts are locked first, so no movement writes between two of their entries.
-- An existing carried_forward entry has no replaced hash to carry: it starts its chain.
DECLARE
    v_users text[];
    v_user text := NULL;
    v_prev text;
    e ledger_entries;
BEGIN
    SELECT array_agg(a.user_id ORDER BY a.user_id) INTO v_users
    FROM (SELECT a.user_id FROM accounts a
          WHERE p_after IS NULL OR a.user_id > p_after
          ORDER BY a.user_id LIMIT p_users FOR UPDATE) a;
    IF v_users IS NULL THEN
        RETURN NULL;
    END IF;
    FOR e IN
        SELECT * FROM ledger_entries l WHERE l.user_id = ANY(v_users) AND l.hash IS NULL
        ORDER BY l.user_id, l.created_at, l.id
    LOOP
        IF v_user IS DISTINCT FROM e.user_id THEN
            v_user := e.user_id;
            v_prev := repeat('0', 64);
        END IF;
        e.prev_hash := v_prev;
        v_prev := tokens_entry_hash(
            v_prev, e.id, e.user_id, e.operation_type, e.tokens_amount, e.balance_before,
            e.balance_after, e.idempotency_key, e.original_entry_id, e.created_at, e.spent_by,
            (SELECT o.canonical FROM tokens_canonical_objects(ARRAY[e.metadata]) AS o));
        UPDATE ledger_entries SET prev_hash = e.prev_hash, hash = v_prev WHERE id = e.id;
    END LOOP;
    RETURN v_users[cardinality(v_users)];
END
$fn$;
