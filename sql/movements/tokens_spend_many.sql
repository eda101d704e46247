CREATE OR REPLACE FUNCTION tokens_spend_many(
    p_users text[], p_keys text[], p_digests text[], p_ops text[], p_amounts bigint[],
    p_overdrafts boolean[], p_metadata jsonb[]
) RETURNS TABLE (
    status text, available bigint, entry_id bigint, balance bigint, reserved bigint,
    spent bigint, response jsonb, expired_tokens bigint[], expired_balances bigint[],
    pool text, refused jsonb
) LANGUAGE plpgsql VOLATILE AS $fn$
-- Each item a debit as tokens_spend makes it, in the order given, one row each. The locks come
-- first, in the order every movement takes them: the items' keys in (user, key) order, then
-- the accounts that hold their balances (a member's pool) in user order, so two batches over
-- the same users never wait on each other in a circle. A refused item gives its key back for
-- a later item of the batch (as the rollback of
-- a refused debit does); a later item with the key of an applied one is its replay.
#variable_conflict use_column
DECLARE
    i integer;
    s record;
BEGIN
    INSERT INTO idempotency_records (user_id, key, request_hash, created_at)
    SELECT DISTINCT ON (c.u, c.k) c.u, c.k, c.h, clock_timestamp()
    FROM unnest(p_users, p_keys, p_digests) WITH ORDINALITY AS c(u, k, h, n)
    WHERE c.k IS NOT NULL
    ORDER BY c.u, c.k, c.n
    ON CONFLICT DO NOTHING;
    PERFORM 1 FROM accounts a
    WHERE a.user_id IN (SELECT coalesce(m.pool_id, m.user_id) FROM accounts m
                        WHERE m.user_id = ANY(p_users))
    ORDER BY a.user_id FOR UPDATE;
    FOR i IN 1 .. cardinality(p_users) LOOP
        SELECT * INTO s FROM tokens_spend(p_users[i], p_keys[i], p_digests[i], 'debit', p_ops[i],
                                          p_amounts[i], p_overdrafts[i], p_metadata[i]);
        IF s.status IN ('not_found', 'insufficient', 'limit') AND p_keys[i] IS NOT NULL THEN
            DELETE FROM idempotency_records r
            WHERE r.user_id = p_users[i] AND r.key = p_keys[i] AND r.response IS NULL;
        END IF;
        status := s.status;
        available := s.available;
        entry_id := s.entry_id;
        balance := s.balance;
        reserved := s.reserved;
        spent := s.spent;
        response := s.response;
        expired_tokens := s.expired_tokens;
        expired_balances := s.expired_balances;
        pool := s.pool;
        refused := s.refused;
        RETURN NEXT;
    END LOOP;
END
$fn$;
