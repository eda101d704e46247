CREATE OR REPLACE FUNCTION tokens_entry_event() RETURNS trigger
LANGUAGE plpgsql VOLATILE AS $fn$
-- AFTER INSERT ON ledger_entries, each row: its balance.changed event, whichever path wrote the
-- entry (tokens_write, the renewal statement, the grants.expire chunk, the prune's carry-forward).
-- The row is kept as written; the event's data is rendered from it (and the entry's split, read
-- when the event is) as ledger.user_entries renders an entry.
BEGIN
    PERFORM tokens_event(NEW.user_id, 'balance.changed', to_jsonb(NEW), NEW.created_at, NEW.id);
    RETURN NULL;
END
$fn$;
