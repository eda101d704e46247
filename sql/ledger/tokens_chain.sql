CREATE OR REPLACE FUNCTION tokens_chain() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $fn$
-- BEFORE INSERT ON ledger_entries, each row, whichever path writes the entry: its place in its
-- user's chain. The previous entry is the user's last in the contract's order (created_at, then
-- id); every writer holds the account's lock and stamps created_at no earlier than the account's
-- last change, so the new entry is last. A carried_forward entry (tokens_prune) is a checkpoint
-- and arrives with its hash: the last it replaced.
DECLARE
    v_metadata text := '{}';
BEGIN
    IF NEW.kind = 'carried_forward' AND NEW.hash IS NOT NULL THEN
        RETURN NEW;
    END IF;
    NEW.prev_hash := coalesce(
        (SELECT p.hash FROM ledger_entries p WHERE p.user_id = NEW.user_id
         ORDER BY p.created_at DESC, p.id DESC LIMIT 1),
        repeat('0', 64));
    IF NEW.metadata <> '{}' THEN
        v_metadata := (SELECT o.canonical FROM tokens_canonical_objects(ARRAY[NEW.metadata]) AS o);
    END IF;
    NEW.hash := tokens_entry_hash(
        NEW.prev_hash, NEW.id, NEW.user_id, NEW.operation_type, NEW.tokens_amount,
        NEW.balance_before, NEW.balance_after, NEW.idempotency_key, NEW.original_entry_id,
        NEW.created_at, NEW.spent_by, v_metadata);
    RETURN NEW;
END
$fn$;
