CREATE OR REPLACE FUNCTION tokens_expire_grant(
    p_user text, p_grant bigint, p_tokens bigint, p_now timestamptz
) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_balance bigint;
    v_entry bigint;
BEGIN
    UPDATE grants SET
        remaining = remaining - p_tokens,
        expired = expired + p_tokens,
        status = CASE WHEN remaining = p_tokens THEN 'expired' ELSE status END,
        ended_at = coalesce(ended_at, expires_at, p_now)
    WHERE id = p_grant;
    UPDATE accounts SET
        tokens_balance = tokens_balance - p_tokens,
        updated_at = p_now
    WHERE user_id = p_user
    RETURNING tokens_balance INTO v_balance;
    INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount, balance_before,
                                balance_after, idempotency_key, original_entry_id, metadata,
                                created_at)
    VALUES (p_user, 'expiry', 'expiry', -p_tokens, v_balance + p_tokens, v_balance, NULL, NULL,
            jsonb_build_object('grant_id', p_grant::text), p_now)
    RETURNING id INTO v_entry;
    INSERT INTO entry_grants (entry_id, grant_id, amount, seq)
    VALUES (v_entry, p_grant, -p_tokens, 0);
    RETURN v_balance;
END
$fn$;
