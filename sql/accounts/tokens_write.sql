CREATE OR REPLACE FUNCTION tokens_write(
    p_user text, p_kind text, p_op text, p_delta bigint, p_debt_delta bigint,
    p_spent_delta bigint, p_key text, p_metadata jsonb, p_now timestamptz,
    p_gids bigint[], p_amounts bigint[], p_original bigint DEFAULT NULL,
    p_reserved_delta bigint DEFAULT 0, p_spent_by text DEFAULT NULL,
    OUT entry_id bigint, OUT balance bigint, OUT reserved bigint, OUT spent bigint,
    OUT response jsonb
) LANGUAGE plpgsql VOLATILE AS $fn$
-- The one write of a movement: the account moved by p_delta (its debt, its reserved tokens and
-- tokens_spent, never below 0, by theirs), the ledger entry (against p_original, for a refund)
-- and its split (p_gids, p_amounts in order), and the outcome stored under p_key. A member's
-- movement (p_spent_by) is written in its pool's ledger (p_user): the member's tokens_spent
-- moves too, the outcome is the member's (its user_id and tokens_spent, the pool's balance)
-- and its key is the member's.
#variable_conflict use_column
BEGIN
    UPDATE accounts SET
        tokens_balance = tokens_balance + p_delta,
        debt = debt + p_debt_delta,
        tokens_reserved = tokens_reserved + p_reserved_delta,
        tokens_spent = CASE WHEN tokens_spent + p_spent_delta < 0 THEN 0
                            ELSE tokens_spent + p_spent_delta END,
        updated_at = p_now
    WHERE user_id = p_user
    RETURNING tokens_balance, tokens_reserved, tokens_spent INTO balance, reserved, spent;
    INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount, balance_before,
                                balance_after, idempotency_key, original_entry_id, metadata,
                                created_at, spent_by)
    VALUES (p_user, p_kind, p_op, p_delta, balance - p_delta, balance, p_key, p_original,
            p_metadata, p_now, p_spent_by)
    RETURNING id INTO entry_id;
    IF cardinality(p_gids) > 0 THEN
        INSERT INTO entry_grants (entry_id, grant_id, amount, seq, created_at)
        SELECT tokens_write.entry_id, s.gid, s.amount, (s.n - 1)::integer, p_now
        FROM unnest(p_gids, p_amounts) WITH ORDINALITY AS s(gid, amount, n);
    END IF;
    IF p_spent_by IS NOT NULL THEN
        UPDATE accounts SET
            tokens_spent = CASE WHEN tokens_spent + p_spent_delta < 0 THEN 0
                                ELSE tokens_spent + p_spent_delta END,
            updated_at = p_now
        WHERE user_id = p_spent_by
        RETURNING tokens_spent INTO spent;
    END IF;
    response := jsonb_build_object(
        'success', true, 'user_id', coalesce(p_spent_by, p_user), 'operation_type', p_op,
        'amount', p_delta, 'balance_before', balance - p_delta, 'new_balance', balance,
        'tokens_spent', spent, 'ledger_entry_id', entry_id::text, 'replayed', false);
    IF p_key IS NOT NULL THEN
        UPDATE idempotency_records r SET response = tokens_write.response
        WHERE r.user_id = coalesce(p_spent_by, p_user) AND r.key = p_key;
    END IF;
END
$fn$;
