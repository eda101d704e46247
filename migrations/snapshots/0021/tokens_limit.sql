CREATE OR REPLACE FUNCTION tokens_limit(
    p_pool text, p_spender text, p_limited boolean, p_amount bigint, p_at timestamptz,
    p_hold bigint, p_now timestamptz, p_check boolean
) RETURNS jsonb LANGUAGE plpgsql VOLATILE AS $fn$
-- What a movement of p_spender (a member of p_pool, or the pool itself), whose pool is locked,
-- counts: p_hold more held by its reservations. Returns the limit that refuses it, or NULL.
BEGIN
    IF p_hold <> 0 AND p_spender <> p_pool THEN
        UPDATE accounts a SET subtree_held = a.subtree_held + p_hold
        WHERE a.user_id IN (p_spender, (SELECT m.parent_id FROM accounts m
                                        WHERE m.user_id = p_spender))
          AND a.user_id <> p_pool;
    END IF;
    RETURN NULL;
END
$fn$;
