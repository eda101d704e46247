CREATE OR REPLACE FUNCTION tokens_grant_due(g grants, p_now timestamptz) RETURNS boolean
LANGUAGE sql IMMUTABLE AS $fn$
-- The one definition of a grant due to expire at p_now: active, past its end, and with tokens
-- no reservation holds. A single expression, so the planner inlines it into each query that
-- asks, and the partial index ix_grants_active_expiry still finds the due grants.
    SELECT g.status = 'active' AND g.expires_at IS NOT NULL AND g.expires_at <= p_now
       AND g.remaining > g.held
$fn$;
