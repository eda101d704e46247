CREATE OR REPLACE FUNCTION tokens_event_done(
    e events, p_cutoff timestamptz, p_celery_pos bigint, p_webhook boolean
) RETURNS boolean LANGUAGE sql IMMUTABLE AS $fn$
-- The one definition of an event the prune may remove: numbered, written before p_cutoff, and
-- delivered by every configured push channel: the Celery channel up to p_celery_pos (NULL: no
-- such channel), the webhook each one (p_webhook). Once true it stays true: a place is never
-- taken back, a channel's position only grows and a delivery is never undone.
    SELECT e.pos IS NOT NULL AND e.at < p_cutoff
       AND (p_celery_pos IS NULL OR e.pos <= p_celery_pos)
       AND (NOT p_webhook OR e.webhook_done_at IS NOT NULL)
$fn$;
