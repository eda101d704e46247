CREATE OR REPLACE FUNCTION tokens_refund(
    p_user text, p_key text, p_digest text, p_original bigint, p_amount bigint,
    p_metadata jsonb,
    OUT status text, OUT charged bigint, OUT refunded bigint, OUT entry_id bigint,
    OUT balance bigint, OUT reserved bigint, OUT spent bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[],
    OUT ended_tokens bigint[], OUT ended_balances bigint[], OUT pool text
) LANGUAGE plpgsql VOLATILE AS $fn$
-- A member (p_user) refunds into its pool, and only entries it spent itself; a pool any entry
-- of its ledger. Against an original, the refund gives back what the entry counted against the
-- spend limits of its spender and the accounts above it, in the entry's own windows.
#variable_conflict use_column
DECLARE
    v_limited boolean;
    v_at timestamptz;
    v_spender text;
    v_now timestamptz;
    v_debt bigint;
    v_debt_delta bigint := 0;
    v_already bigint := 0;
    v_skip bigint;
    v_left bigint;
    v_share bigint;
    v_paid bigint;
    v_grant bigint;
    v_ended boolean;
    v_gids bigint[] := '{}';
    v_amounts bigint[] := '{}';
    v_ended_gids bigint[] := '{}';
    s record;
BEGIN
    expired_tokens := '{}';
    expired_balances := '{}';
    ended_tokens := '{}';
    ended_balances := '{}';
    -- The key before anything else (tokens_claim, 0008).
    SELECT c.status, c.response INTO status, response FROM tokens_claim(p_user, p_key, p_digest) c;
    IF status IS NOT NULL THEN
        RETURN;
    END IF;

    -- The account lock, the movement's time and the due grants' expiry (tokens_lock). A prune
    -- takes this lock too, so none is in flight for this user from here on.
    SELECT l.balance, l.reserved, l.spent, l.debt, l.moment, l.expired_tokens,
           l.expired_balances, l.pool, l.limited
    INTO balance, reserved, spent, v_debt, v_now, expired_tokens, expired_balances, pool,
         v_limited
    FROM tokens_lock(p_user) l;
    IF v_now IS NULL THEN
        status := 'not_found';
        RETURN;
    END IF;

    -- The refund cap, under the account lock: the original entry as committed now (a prune of
    -- this user waits for the lock, so it stays until this commits; no row lock on the entry,
    -- which the worker's role could not take: it may not UPDATE the ledger), and one upsert of
    -- its cap row that checks and adds.
    IF p_original IS NOT NULL THEN
        SELECT -e.tokens_amount, e.created_at, coalesce(e.spent_by, e.user_id)
        INTO charged, v_at, v_spender
        FROM ledger_entries e
        WHERE e.id = p_original AND e.user_id = pool
          AND (p_user = pool OR e.spent_by = p_user)
          AND e.kind IN ('debit', 'charge', 'capture');
        IF NOT FOUND THEN
            status := 'entry_not_found';
            RETURN;
        END IF;
        v_already := NULL;
        IF p_amount <= charged THEN
            INSERT INTO refund_totals AS t (entry_id, entry_created_at, user_id, charged, refunded)
            VALUES (p_original, v_at, pool, tokens_refund.charged, p_amount)
            ON CONFLICT (entry_id) DO UPDATE SET refunded = t.refunded + p_amount
            WHERE t.refunded + p_amount <= t.charged
            RETURNING t.refunded - p_amount INTO v_already;
        END IF;
        IF v_already IS NULL THEN
            SELECT t.refunded INTO refunded FROM refund_totals t WHERE t.entry_id = p_original;
            refunded := coalesce(refunded, 0);
            status := 'exceeds';
            RETURN;
        END IF;
    END IF;

    -- Where the tokens go (movements._put_back), skipping what earlier refunds returned:
    -- 1. what the original took as debt (what its split does not cover), 2. its grants, last
    -- spent first, 3. the rest (no original, or an entry older than grants) as a new grant.
    -- Without an original only 3. has tokens.
    v_skip := v_already;
    v_left := p_amount;
    FOR s IN
        SELECT 1 AS part, NULL::bigint AS gid,
               coalesce(tokens_refund.charged, 0) + coalesce(sum(eg.amount), 0)::bigint AS took,
               0 AS seq
        FROM entry_grants eg
        WHERE eg.entry_id = p_original AND eg.created_at = v_at AND eg.amount < 0
        UNION ALL
        SELECT 2, eg.grant_id, -eg.amount, eg.seq
        FROM entry_grants eg
        WHERE eg.entry_id = p_original AND eg.created_at = v_at AND eg.amount < 0
        UNION ALL
        SELECT 3, NULL, p_amount + v_already, 0
        ORDER BY part, seq DESC
    LOOP
        IF v_skip >= s.took THEN
            v_skip := v_skip - s.took;
            CONTINUE;
        END IF;
        v_share := least(s.took - v_skip, v_left);
        v_skip := 0;
        v_left := v_left - v_share;
        IF s.gid IS NOT NULL THEN
            -- grants.Change.put_back: is the grant ended (expired, or past its end)?
            UPDATE grants gr SET
                remaining = gr.remaining + v_share,
                returned = gr.returned + v_share,
                status = CASE WHEN gr.status = 'depleted' THEN 'active' ELSE gr.status END,
                ended_at = CASE WHEN gr.status = 'depleted' THEN NULL ELSE gr.ended_at END
            WHERE gr.id = s.gid
            RETURNING gr.status = 'expired'
                      OR (gr.expires_at IS NOT NULL AND gr.expires_at <= v_now)
            INTO v_ended;
            v_gids := v_gids || s.gid;
            v_amounts := v_amounts || v_share;
            IF v_ended THEN
                v_ended_gids := v_ended_gids || s.gid;
                ended_tokens := ended_tokens || v_share;
            END IF;
        ELSE
            -- Debt first. The debt part makes a grant only of what is left after the debt; the
            -- rest is always a grant (grants.Change.grant: depleted if the debt took it all).
            -- 50: grants.DEFAULT_PRIORITY of an adjustment.
            v_paid := least(v_debt + v_debt_delta, v_share);
            v_debt_delta := v_debt_delta - v_paid;
            IF s.part = 3 OR v_share > v_paid THEN
                INSERT INTO grants (user_id, kind, amount, remaining, held, spent, expired,
                                    returned, priority, expires_at, status, created_at, ended_at)
                VALUES (pool, 'adjustment',
                        CASE WHEN s.part = 3 THEN v_share ELSE v_share - v_paid END,
                        v_share - v_paid, 0, CASE WHEN s.part = 3 THEN v_paid ELSE 0 END, 0, 0,
                        50, NULL, CASE WHEN v_share > v_paid THEN 'active' ELSE 'depleted' END,
                        v_now, CASE WHEN v_share > v_paid THEN NULL ELSE v_now END)
                RETURNING id INTO v_grant;
                v_gids := v_gids || v_grant;
                v_amounts := v_amounts || (v_share - v_paid);
            END IF;
        END IF;
        EXIT WHEN v_left = 0;
    END LOOP;

    -- The account, the entry against its original with its split, and the stored outcome.
    SELECT w.entry_id, w.balance, w.reserved, w.spent, w.response
    INTO entry_id, balance, reserved, spent, response
    FROM tokens_write(pool, 'refund', 'refund', p_amount, v_debt_delta, -p_amount, p_key,
                      p_metadata, v_now, v_gids, v_amounts, p_original,
                      p_spent_by => nullif(p_user, pool)) w;
    IF p_original IS NOT NULL THEN
        PERFORM tokens_limit(pool, v_spender, v_limited, -p_amount, v_at, 0, v_now, false);
    END IF;

    -- A refund never revives an ended grant: what went back into one leaves again at once.
    FOR i IN 1 .. cardinality(v_ended_gids) LOOP
        ended_balances := ended_balances
            || tokens_expire_grant(pool, v_ended_gids[i], ended_tokens[i], v_now);
    END LOOP;

    status := 'ok';
END
$fn$;
