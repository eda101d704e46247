CREATE OR REPLACE FUNCTION tokens_entry_hash(
    p_prev text, e_id bigint, e_user_id text, e_operation_type text, e_tokens_amount bigint,
    e_balance_before bigint, e_balance_after bigint, e_idempotency_key text,
    e_original_entry_id bigint, e_created_at timestamptz, e_spent_by text, p_metadata text)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $fn$
-- The contract's hash of an entry: SHA-256 (lowercase hex) of the previous entry's hash, a
-- newline and the canonical JSON of the entry's eleven fields as ledger.user_entries returns
-- them (keys sorted; id and original_entry_id decimal strings; created_at in Python's
-- isoformat, UTC, microseconds only when not zero; spent_by null for the account's own).
-- p_metadata: the metadata's canonical form (tokens_canonical_objects), which a caller hashing
-- many entries writes for all of them at once. The fields come as values, not as the entry's
-- row: ledger.verify hashes millions, and reading each field out of a row value cost it 10 %.
SELECT encode(sha256(convert_to(
    p_prev || E'\n'
    || '{"balance_after":' || e_balance_after
    || ',"balance_before":' || e_balance_before
    || ',"created_at":"'
    || to_char(e_created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS')
    || CASE WHEN date_part('microseconds', e_created_at)::bigint % 1000000 = 0 THEN ''
            ELSE to_char(e_created_at AT TIME ZONE 'UTC', '.US') END
    || '+00:00"'
    || ',"id":"' || e_id || '"'
    || ',"idempotency_key":' || coalesce(to_json(e_idempotency_key)::text, 'null')
    || ',"metadata":' || p_metadata
    || ',"operation_type":' || to_json(e_operation_type)::text
    || ',"original_entry_id":'
    || coalesce('"' || e_original_entry_id || '"', 'null')
    || ',"spent_by":' || coalesce(to_json(e_spent_by)::text, 'null')
    || ',"tokens_amount":' || e_tokens_amount
    || ',"user_id":' || to_json(e_user_id)::text
    || '}',
    'UTF8')), 'hex')
$fn$;
