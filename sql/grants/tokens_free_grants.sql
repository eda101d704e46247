CREATE OR REPLACE FUNCTION tokens_free_grants(p_user text, p_now timestamptz)
RETURNS TABLE (id bigint, free bigint, burn_rank bigint)
LANGUAGE sql STABLE AS $fn$
-- The burn order, defined once: the user's live grants with free tokens (what reservations do
-- not hold), by priority, then the earliest end (never ending last), then creation. A caller
-- orders by burn_rank.
    SELECT gr.id, gr.remaining - gr.held,
           row_number() OVER (ORDER BY gr.priority, gr.expires_at NULLS LAST, gr.created_at,
                                       gr.id)
    FROM grants gr
    WHERE gr.user_id = p_user AND gr.status = 'active' AND gr.remaining > gr.held
      AND (gr.expires_at IS NULL OR gr.expires_at > p_now)
$fn$;
