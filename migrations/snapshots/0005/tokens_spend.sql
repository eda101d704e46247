CREATE OR REPLACE FUNCTION tokens_spend(
    p_user text, p_key text, p_digest text, p_kind text, p_op text, p_amount bigint,
    p_overdraft boolean, p_metadata jsonb,
    OUT status text, OUT available bigint, OUT entry_id bigint, OUT balance bigint,
    OUT reserved bigint, OUT spent bigint, OUT response jsonb,
    OUT expired_tokens bigint[], OUT expired_balances bigint[]
) LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    v_hash text;
    v_now timestamptz;
    v_debt bigint;
    v_left bigint;
    v_take bigint;
    v_entry bigint;
    v_gids bigint[] := '{}';
    v_amounts bigint[] := '{}';
    g record;
BEGIN
    expired_tokens := '{}';
    expired_balances := '{}';
    -- Idempotency claim (accounting/idempotency.py claim): the key before the account.
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
            -- else this transaction's own claim, made ahead (a batch's claim_many)
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
        UPDATE grants SET
            remaining = remaining - g.free,
            expired = expired + g.free,
            status = CASE WHEN remaining = g.free THEN 'expired' ELSE grants.status END,
            ended_at = coalesce(ended_at, expires_at, v_now)
        WHERE id = g.id;
        UPDATE accounts SET
            tokens_balance = tokens_balance - g.free,
            updated_at = v_now
        WHERE user_id = p_user
        RETURNING tokens_balance INTO balance;
        INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount, balance_before,
                                    balance_after, idempotency_key, original_entry_id, metadata,
                                    created_at)
        VALUES (p_user, 'expiry', 'expiry', -g.free, balance + g.free, balance, NULL, NULL,
                jsonb_build_object('grant_id', g.id::text), v_now)
        RETURNING id INTO v_entry;
        INSERT INTO entry_grants (entry_id, grant_id, amount, seq)
        VALUES (v_entry, g.id, -g.free, 0);
        expired_tokens := expired_tokens || g.free;
        expired_balances := expired_balances || balance;
    END LOOP;

    -- The guard.
    available := balance - reserved;
    IF NOT p_overdraft AND available < p_amount THEN
        status := 'insufficient';
        RETURN;
    END IF;

    -- Burn-down in burn order (grants.Change.spend); what no grant covers becomes debt.
    v_left := p_amount;
    FOR g IN
        SELECT gr.id, gr.remaining - gr.held AS free
        FROM grants gr
        WHERE gr.user_id = p_user AND gr.status = 'active' AND gr.remaining > gr.held
          AND (gr.expires_at IS NULL OR gr.expires_at > v_now)
        ORDER BY gr.priority, gr.expires_at NULLS LAST, gr.created_at, gr.id
    LOOP
        v_take := least(g.free, v_left);
        UPDATE grants SET
            remaining = remaining - v_take,
            spent = grants.spent + v_take,
            status = CASE WHEN remaining = v_take THEN 'depleted' ELSE grants.status END,
            ended_at = CASE WHEN remaining = v_take THEN v_now ELSE ended_at END
        WHERE id = g.id;
        v_gids := v_gids || g.id;
        v_amounts := v_amounts || -v_take;
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;

    -- The account, the entry and its split (grants.write), and the stored outcome.
    UPDATE accounts SET
        tokens_balance = tokens_balance - p_amount,
        debt = debt + v_left,
        tokens_spent = CASE WHEN tokens_spent + p_amount < 0 THEN 0
                            ELSE tokens_spent + p_amount END,
        updated_at = v_now
    WHERE user_id = p_user
    RETURNING tokens_balance, tokens_reserved, tokens_spent INTO balance, reserved, spent;
    INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount, balance_before,
                                balance_after, idempotency_key, original_entry_id, metadata,
                                created_at)
    VALUES (p_user, p_kind, p_op, -p_amount, balance + p_amount, balance, p_key, NULL,
            p_metadata, v_now)
    RETURNING id INTO entry_id;
    IF cardinality(v_gids) > 0 THEN
        INSERT INTO entry_grants (entry_id, grant_id, amount, seq)
        SELECT tokens_spend.entry_id, s.gid, s.amount, (s.n - 1)::integer
        FROM unnest(v_gids, v_amounts) WITH ORDINALITY AS s(gid, amount, n);
    END IF;
    response := jsonb_build_object(
        'success', true, 'user_id', p_user, 'operation_type', p_op, 'amount', -p_amount,
        'balance_before', balance + p_amount, 'new_balance', balance, 'tokens_spent', spent,
        'ledger_entry_id', entry_id::text, 'replayed', false);
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records r SET response = tokens_spend.response
        WHERE r.user_id = p_user AND r.key = p_key;
    END IF;
    status := 'ok';
END
$fn$;
