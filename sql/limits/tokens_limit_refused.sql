CREATE OR REPLACE FUNCTION tokens_limit_refused(p_spender text, p_owner text, p_name text)
RETURNS void LANGUAGE plpgsql VOLATILE AS $fn$
-- limit.reached for a request the limit p_name of p_owner refused to p_spender, once per window
-- and limit as tokens_limit writes it for a movement that reaches the limit (the same
-- spend_limits.reached_at). A single request's refusal rolled its statement back, so this runs
-- after it, in a transaction of its own; a batch's, in the batch's. The pool's row is locked
-- first, as every movement locks it; the event's data is the limit as listed now.
DECLARE
    v_pool text;
    v record;
BEGIN
    SELECT CAST(coalesce(a.pool_id, a.user_id) AS text) INTO v_pool
    FROM accounts a WHERE a.user_id = p_spender;
    IF v_pool IS NULL THEN
        RETURN;
    END IF;
    PERFORM 1 FROM accounts a WHERE a.user_id = v_pool FOR UPDATE;
    SELECT t.lo, t.listed INTO v
    FROM tokens_limits(p_spender, NULL) t WHERE t.user_id = p_owner AND t.name = p_name;
    IF NOT FOUND THEN
        RETURN;  -- removed meanwhile
    END IF;
    UPDATE spend_limits l SET reached_at = v.lo
    WHERE l.user_id = p_owner AND l.name = p_name AND l.reached_at IS DISTINCT FROM v.lo;
    IF FOUND THEN
        PERFORM tokens_event(p_owner, 'limit.reached', v.listed, NULL);
    END IF;
END
$fn$;
