CREATE OR REPLACE FUNCTION tokens_refund(
    p_user text, p_key text, p_digest text, p_original bigint, p_amount bigint,
    p_metadata jsonb,
    OUT status text, OUT charged bigint, OUT refunded bigint, OUT entry_id bigint,
    OUT balance bigint, OUT reserved bigint, OUT spent bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[],
    OUT ended_tokens bigint[], OUT ended_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    v_hash text;
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
    g record;
    s record;
BEGIN
    expired_tokens := '{}';
    expired_balances := '{}';
    ended_tokens := '{}';
    ended_balances := '{}';
    -- Idempotency claim (accounting/idempotency.py claim): the key before anything else.
    IF p_key IS NOT NULL THEN
        INSERT INTO idempotency_records (user_id, key, request_hash, created_at)
        VALUES (p_user, p_key, p_digest, clock_timestamp())
        ON CONFLICT DO NOTHING;
        IF NOT FOUND THEN
            SELECT r.request_hash, r.response INTO v_hash, response
            FROM idempotency_records r WHERE r.user_id = p_user AND r.key = p_key;
            IF v_hash <> p_digest THEN
                status := 'conflict';
                RETURN;
            END IF;
            IF response IS NOT NULL THEN
                status := 'replay';
                RETURN;
            END IF;
        END IF;
    END IF;

    -- The refund cap (movements._check_refundable), before the account: one upsert both checks
    -- and adds, so concurrent refunds of one entry serialise on its row.
    IF p_original IS NOT NULL THEN
        SELECT -e.tokens_amount INTO charged
        FROM ledger_entries e
        WHERE e.id = p_original AND e.user_id = p_user
          AND e.kind IN ('debit', 'charge', 'capture');
        IF NOT FOUND THEN
            status := 'entry_not_found';
            RETURN;
        END IF;
        v_already := NULL;
        IF p_amount <= charged THEN
            INSERT INTO refund_totals AS t (entry_id, user_id, charged, refunded)
            VALUES (p_original, p_user, tokens_refund.charged, p_amount)
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

    -- The account lock (accounting/grants.py lock) and the movement's time.
    SELECT a.tokens_balance, a.tokens_reserved, a.tokens_spent, a.debt,
           greatest(clock_timestamp(), a.updated_at)
    INTO balance, reserved, spent, v_debt, v_now
    FROM accounts a WHERE a.user_id = p_user FOR UPDATE;
    IF NOT FOUND THEN
        status := 'not_found';
        RETURN;
    END IF;

    -- Due grants expire first, one expiry entry each, by (expires_at, id) (grants.expire_due).
    FOR g IN
        SELECT gr.id, gr.remaining - gr.held AS free
        FROM grants gr
        WHERE gr.user_id = p_user AND gr.status = 'active' AND gr.remaining > gr.held
          AND gr.expires_at IS NOT NULL AND gr.expires_at <= v_now
        ORDER BY gr.expires_at, gr.id
    LOOP
        balance := tokens_expire_grant(p_user, g.id, g.free, v_now);
        expired_tokens := expired_tokens || g.free;
        expired_balances := expired_balances || balance;
    END LOOP;

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
        FROM entry_grants eg WHERE eg.entry_id = p_original AND eg.amount < 0
        UNION ALL
        SELECT 2, eg.grant_id, -eg.amount, eg.seq
        FROM entry_grants eg WHERE eg.entry_id = p_original AND eg.amount < 0
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
                VALUES (p_user, 'adjustment',
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

    -- The account, the entry and its split (grants.write), and the stored outcome.
    UPDATE accounts SET
        tokens_balance = tokens_balance + p_amount,
        debt = debt + v_debt_delta,
        tokens_spent = CASE WHEN tokens_spent - p_amount < 0 THEN 0
                            ELSE tokens_spent - p_amount END,
        updated_at = v_now
    WHERE user_id = p_user
    RETURNING tokens_balance, tokens_reserved, tokens_spent INTO balance, reserved, spent;
    INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount, balance_before,
                                balance_after, idempotency_key, original_entry_id, metadata,
                                created_at)
    VALUES (p_user, 'refund', 'refund', p_amount, balance - p_amount, balance, p_key,
            p_original, p_metadata, v_now)
    RETURNING id INTO entry_id;
    IF cardinality(v_gids) > 0 THEN
        INSERT INTO entry_grants (entry_id, grant_id, amount, seq)
        SELECT tokens_refund.entry_id, x.gid, x.amount, (x.n - 1)::integer
        FROM unnest(v_gids, v_amounts) WITH ORDINALITY AS x(gid, amount, n);
    END IF;
    response := jsonb_build_object(
        'success', true, 'user_id', p_user, 'operation_type', 'refund', 'amount', p_amount,
        'balance_before', balance - p_amount, 'new_balance', balance, 'tokens_spent', spent,
        'ledger_entry_id', entry_id::text, 'replayed', false);

    -- A refund never revives an ended grant: what went back into one leaves again at once.
    FOR i IN 1 .. cardinality(v_ended_gids) LOOP
        ended_balances := ended_balances
            || tokens_expire_grant(p_user, v_ended_gids[i], ended_tokens[i], v_now);
    END LOOP;

    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records r SET response = tokens_refund.response
        WHERE r.user_id = p_user AND r.key = p_key;
    END IF;
    status := 'ok';
END
$fn$;
