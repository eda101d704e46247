CREATE OR REPLACE FUNCTION tokens_page(
    p_user text, p_type text, p_from timestamptz, p_to timestamptz, p_limit integer,
    p_offset bigint, OUT entries text, OUT due boolean
) LANGUAGE plpgsql STABLE
-- Each statement planned once a session: a custom plan per call (what PostgreSQL chose for a
-- page) planned every month's partitions again, longer than the page took to run.
SET plan_cache_mode = force_generic_plan
AS $fn$
-- A page of the ledger in the contract's order (created_at, id), newest first: the entries, each
-- with its split across grants, as the JSON array of ledger.user_entries' result, read and
-- rendered in one call. p_user's own entries (a pool's hold its members' too), or, for a member
-- of a pool, the pool's entries it spent; with p_user NULL, every account's entries of p_type.
-- p_type, p_from (inclusive) and p_to (exclusive) narrow it when given.
-- due: the account whose ledger it is has a grant due to expire (the expiry entry is not in the
-- page yet: the caller settles it under the account's lock, then reads the page again).
DECLARE
    v_pool text;
    v_rows ledger_entries[];
    v_at timestamptz;
    v_id bigint;
    v_from timestamptz := coalesce(p_from, '-infinity');
    v_to timestamptz := coalesce(p_to, 'infinity');
BEGIN
    due := false;
    IF p_user IS NULL THEN
        v_rows := ARRAY(
            SELECT e FROM ledger_entries e
            WHERE e.operation_type = p_type AND e.created_at >= v_from AND e.created_at < v_to
            ORDER BY e.created_at DESC, e.id DESC LIMIT p_limit OFFSET p_offset);
    ELSE
        SELECT a.pool_id INTO v_pool FROM accounts a WHERE a.user_id = p_user;
        due := EXISTS (
            SELECT FROM grants g
            WHERE g.user_id = coalesce(v_pool, p_user) AND tokens_grant_due(g, clock_timestamp()));
        IF v_pool IS NULL AND p_type IS NULL AND p_offset > 0 THEN
            -- A page further back: its first entry is found in the index alone (the entries it
            -- passes over are never read from the table), and the page is read from there.
            SELECT e.created_at, e.id INTO v_at, v_id FROM ledger_entries e
            WHERE e.user_id = p_user AND e.created_at >= v_from AND e.created_at < v_to
            ORDER BY e.created_at DESC, e.id DESC LIMIT 1 OFFSET p_offset;
            v_rows := ARRAY(
                SELECT e FROM ledger_entries e
                WHERE e.user_id = p_user AND e.created_at >= v_from AND e.created_at <= v_at
                  AND (e.created_at, e.id) <= (v_at, v_id)
                ORDER BY e.created_at DESC, e.id DESC LIMIT p_limit);
        ELSIF v_pool IS NULL THEN
            v_rows := ARRAY(
                SELECT e FROM ledger_entries e
                WHERE e.user_id = p_user AND (p_type IS NULL OR e.operation_type = p_type)
                  AND e.created_at >= v_from AND e.created_at < v_to
                ORDER BY e.created_at DESC, e.id DESC LIMIT p_limit OFFSET p_offset);
        ELSE
            v_rows := ARRAY(
                SELECT e FROM ledger_entries e
                WHERE e.spent_by = p_user AND e.user_id = v_pool
                  AND (p_type IS NULL OR e.operation_type = p_type)
                  AND e.created_at >= v_from AND e.created_at < v_to
                ORDER BY e.created_at DESC, e.id DESC LIMIT p_limit OFFSET p_offset);
        END IF;
    END IF;
    SELECT coalesce(json_agg(json_build_object(
               'id', u.id::text, 'user_id', u.user_id, 'operation_type', u.operation_type,
               'tokens_amount', u.tokens_amount, 'balance_before', u.balance_before,
               'balance_after', u.balance_after, 'idempotency_key', u.idempotency_key,
               'original_entry_id', u.original_entry_id::text, 'metadata', u.metadata,
               'created_at', u.created_at, 'spent_by', u.spent_by, 'prev_hash', u.prev_hash,
               'hash', u.hash,
               -- created_at too: the splits are partitioned by it (one month's index probed).
               'grants', coalesce((
                   SELECT json_agg(json_build_object('grant_id', eg.grant_id::text,
                                                     'amount', eg.amount) ORDER BY eg.seq)
                   FROM entry_grants eg
                   WHERE eg.entry_id = u.id AND eg.created_at = u.created_at), '[]'))
           ORDER BY u.ordinality), '[]')::text
    INTO entries
    FROM unnest(v_rows) WITH ORDINALITY u;
END
$fn$;
