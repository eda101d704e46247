CREATE OR REPLACE FUNCTION tokens_expire_grant(
    p_user text, p_grant bigint, p_tokens bigint, p_now timestamptz
) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $fn$
-- Write off p_tokens of an ended grant through its own expiry entry (tokens_write); the
-- account is locked. Returns the balance after.
DECLARE
    v_balance bigint;
BEGIN
    UPDATE grants SET
        remaining = remaining - p_tokens,
        expired = expired + p_tokens,
        status = CASE WHEN remaining = p_tokens THEN 'expired' ELSE status END,
        ended_at = coalesce(ended_at, expires_at, p_now)
    WHERE id = p_grant;
    SELECT w.balance INTO v_balance
    FROM tokens_write(p_user, 'expiry', 'expiry', -p_tokens, 0, 0, NULL,
                      jsonb_build_object('grant_id', p_grant::text), p_now,
                      ARRAY[p_grant], ARRAY[-p_tokens]) w;
    RETURN v_balance;
END
$fn$;
