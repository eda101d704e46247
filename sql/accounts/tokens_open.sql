CREATE OR REPLACE FUNCTION tokens_open(
    p_user text, p_tier text, p_initial bigint, p_subscription_expires_at timestamptz,
    p_last_renewal_at timestamptz,
    OUT created boolean, OUT entry_id bigint
) LANGUAGE plpgsql VOLATILE AS $fn$
-- A new account; its initial balance is an adjustment grant (tokens_grant: there is no debt to
-- pay yet) and entry (tokens_write). An account that exists is left as it is (created false).
DECLARE
    v_now timestamptz := clock_timestamp();
    g record;
BEGIN
    INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, debt, tokens_spent,
                          last_renewal_at, subscription_expires_at, created_at, updated_at)
    VALUES (p_user, p_tier, 0, 0, 0, 0, p_last_renewal_at, p_subscription_expires_at,
            v_now, v_now)
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
