CREATE OR REPLACE FUNCTION tokens_expire_due(
    p_user text, p_now timestamptz, OUT tokens bigint[], OUT balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    g record;
BEGIN
    tokens := '{}';
    balances := '{}';
    -- One expiry entry per due grant, by (expires_at, id); the account is locked.
    FOR g IN
        SELECT gr.id, gr.remaining - gr.held AS free
        FROM grants gr
        WHERE gr.user_id = p_user AND tokens_grant_due(gr, p_now)
        ORDER BY gr.expires_at, gr.id
    LOOP
        balances := balances || tokens_expire_grant(p_user, g.id, g.free, p_now);
        tokens := tokens || g.free;
    END LOOP;
END
$fn$;
