CREATE OR REPLACE FUNCTION tokens_renew(
    p_user text, p_tier text, p_allocation bigint, p_cutoff timestamptz, p_paid boolean,
    p_resets boolean, p_rollover_max bigint, p_ends timestamptz, p_priority integer,
    p_now timestamptz, p_source text,
    OUT renewed boolean, OUT balance bigint, OUT reserved bigint, OUT expired bigint,
    OUT rolled bigint, OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
-- One renewal of a user of tier p_tier, whose account the caller has locked; renewed is false
-- when the user is not due (renewed meanwhile, another tier, a lapsed paid subscription).
-- The guard marks the period first (last_renewal_at = p_now, the eligibility instant), so two
-- renewals of one period cannot both pass it. Then, as before any movement, the due grants
-- leave (tokens_lock). Under the reset policy the previous allowance and rollover end, less
-- what reservations hold: one expiry entry, keeping up to p_rollover_max of the allowance
-- still running as a rollover grant. The allowance pays the debt first (tokens_grant), and
-- the monthly_reset entry carries it. An expiry entry's id comes before the reset's and a
-- rollover's before the allowance's: entries chain, and grants burn, in id order.
DECLARE
    v_debt bigint;
    v_now timestamptz;
    v_base bigint;
    v_ended bigint[];
    v_gids bigint[];
    v_amounts bigint[];
    g record;
BEGIN
    UPDATE accounts a SET last_renewal_at = p_now
    WHERE a.user_id = p_user AND a.tier = p_tier
      AND (a.last_renewal_at IS NULL OR a.last_renewal_at < p_cutoff)
      AND (NOT p_paid OR a.subscription_expires_at IS NULL OR a.subscription_expires_at > p_now);
    renewed := FOUND;
    IF NOT renewed THEN
        RETURN;
    END IF;
    SELECT l.balance, l.reserved, l.debt, l.moment, l.expired_tokens, l.expired_balances
    INTO balance, reserved, v_debt, v_now, expired_tokens, expired_balances
    FROM tokens_lock(p_user) l;
    expired := 0;
    rolled := 0;
    IF p_resets THEN
        SELECT coalesce(sum(gr.remaining - gr.held), 0),
               coalesce(sum(gr.remaining - gr.held) FILTER (
                   WHERE gr.kind = 'allowance' AND (gr.expires_at IS NULL OR gr.expires_at > v_now)
               ), 0),
               array_agg(gr.id ORDER BY gr.id) FILTER (WHERE gr.remaining > gr.held),
               array_agg(gr.held - gr.remaining ORDER BY gr.id) FILTER (
                   WHERE gr.remaining > gr.held)
        INTO expired, v_base, v_ended, v_amounts
        FROM grants gr
        WHERE gr.user_id = p_user AND gr.kind IN ('allowance', 'rollover')
          AND gr.status = 'active';
        UPDATE grants gr SET
            remaining = gr.held,
            expired = gr.expired + gr.remaining - gr.held,
            status = CASE WHEN gr.held = 0 THEN 'expired' ELSE gr.status END,
            ended_at = CASE WHEN gr.held = 0 THEN v_now ELSE gr.ended_at END,
            expires_at = least(coalesce(gr.expires_at, v_now), v_now)
        WHERE gr.user_id = p_user AND gr.kind IN ('allowance', 'rollover')
          AND gr.status = 'active';
        rolled := least(v_base, p_rollover_max);
        IF expired > 0 THEN
            v_gids := v_ended;
            IF rolled > 0 THEN
                SELECT * INTO g FROM tokens_grant(
                    p_user, 'rollover', rolled, p_priority, p_ends, 0, v_now);
                v_gids := v_gids || g.grant_id;
                v_amounts := v_amounts || rolled;
            END IF;
            SELECT w.balance INTO balance
            FROM tokens_write(p_user, 'expiry', 'expiry', rolled - expired, 0, 0, NULL,
                              jsonb_build_object('grant_id', v_ended[1]::text,
                                                 'grant_ids', to_jsonb(v_ended::text[]),
                                                 'reason', 'renewal'),
                              v_now, v_gids, v_amounts) w;
        END IF;
    END IF;
    v_gids := '{}';
    v_amounts := '{}';
    IF p_allocation > 0 THEN
        SELECT * INTO g FROM tokens_grant(
            p_user, 'allowance', p_allocation, p_priority, p_ends, v_debt, v_now);
        v_gids := ARRAY[g.grant_id];
        v_amounts := ARRAY[g.kept];
    END IF;
    SELECT w.balance INTO balance
    FROM tokens_write(p_user, 'renewal', 'monthly_reset', p_allocation,
                      -least(v_debt, p_allocation), 0, NULL,
                      jsonb_build_object('tier', p_tier, 'source', p_source), v_now,
                      v_gids, v_amounts) w;
END
$fn$;
