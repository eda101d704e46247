CREATE OR REPLACE FUNCTION tokens_open(
    p_user text, p_tier text, p_initial bigint, p_subscription_expires_at timestamptz,
    p_last_renewal_at timestamptz, p_parent text DEFAULT NULL,
    OUT created boolean, OUT entry_id bigint, OUT status text
) LANGUAGE plpgsql VOLATILE AS $fn$
-- A new account; its initial balance is an adjustment grant (tokens_grant: there is no debt to
-- pay yet) and entry (tokens_write). An account that exists is left as it is (created false).
-- Under p_parent it is a member of the parent's pool (the caller has refused an initial
-- balance): status 'parent_not_found', or 'too_deep' when the parent is already a third level.
-- A parent's own parent never changes, so the depth is read without a lock.
DECLARE
    v_now timestamptz := clock_timestamp();
    v_pool text;
    v_above text;
    g record;
BEGIN
    IF p_parent IS NOT NULL THEN
        SELECT coalesce(a.pool_id, a.user_id),
               (SELECT up.parent_id FROM accounts up WHERE up.user_id = a.parent_id)
        INTO v_pool, v_above
        FROM accounts a WHERE a.user_id = p_parent;
        IF NOT FOUND THEN
            status := 'parent_not_found';
            RETURN;
        END IF;
        IF v_above IS NOT NULL THEN
            status := 'too_deep';
            RETURN;
        END IF;
    END IF;
    INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, debt, tokens_spent,
                          last_renewal_at, subscription_expires_at, created_at, updated_at,
                          parent_id, pool_id)
    VALUES (p_user, p_tier, 0, 0, 0, 0, p_last_renewal_at, p_subscription_expires_at,
            v_now, v_now, p_parent, v_pool)
    ON CONFLICT (user_id) DO NOTHING;
    created := FOUND;
    IF NOT created OR p_initial = 0 THEN
        RETURN;
    END IF;
    -- 50: grants.DEFAULT_PRIORITY of an adjustment.
    SELECT * INTO g FROM tokens_grant(p_user, 'adjustment', p_initial, 50, NULL, 0, v_now);
    SELECT w.entry_id INTO entry_id
    FROM tokens_write(p_user, 'adjustment', 'adjustment', p_initial, 0, 0, NULL,
                      '{"reason": "initial_balance"}', v_now, ARRAY[g.grant_id],
                      ARRAY[g.kept]) w;
END
$fn$;
