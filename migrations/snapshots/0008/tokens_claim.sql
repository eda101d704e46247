CREATE OR REPLACE FUNCTION tokens_claim(
    p_user text, p_key text, p_digest text, OUT status text, OUT response jsonb
) LANGUAGE plpgsql VOLATILE AS $fn$
-- status: NULL (claimed, or no key), 'conflict' or 'replay' (with the stored response).
#variable_conflict use_column
DECLARE
    v_hash text;
BEGIN
    IF p_key IS NULL THEN
        RETURN;
    END IF;
    INSERT INTO idempotency_records (user_id, key, request_hash, created_at)
    VALUES (p_user, p_key, p_digest, clock_timestamp())
    ON CONFLICT DO NOTHING;
    IF FOUND THEN
        RETURN;
    END IF;
    SELECT r.request_hash, r.response INTO v_hash, response
    FROM idempotency_records r WHERE r.user_id = p_user AND r.key = p_key;
    IF v_hash <> p_digest THEN
        status := 'conflict';
        response := NULL;
    ELSIF response IS NOT NULL THEN
        status := 'replay';
    END IF;
    -- else this transaction's own claim, made ahead (a batch's claim_many)
END
$fn$;
