CREATE OR REPLACE FUNCTION tokens_free_grants(p_user text, p_now timestamptz)
RETURNS TABLE (id bigint, free bigint, burn_rank bigint)
LANGUAGE sql STABLE AS $fn$
-- The user's live grants with free tokens (what reservations do not hold), ranked in burn order
-- (tokens_burn_order). A caller orders by burn_rank.
    SELECT gr.id, gr.remaining - gr.held,
           row_number() OVER (
               ORDER BY tokens_burn_order(gr.priority, gr.expires_at, gr.created_at, gr.id))
    FROM grants gr
    WHERE gr.user_id = p_user AND gr.status = 'active' AND gr.remaining > gr.held
      AND (gr.expires_at IS NULL OR gr.expires_at > p_now)
$fn$;
