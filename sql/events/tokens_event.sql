CREATE OR REPLACE FUNCTION tokens_event(
    p_user text, p_type text, p_data jsonb, p_at timestamptz DEFAULT NULL,
    p_entry bigint DEFAULT NULL
) RETURNS bigint LANGUAGE plpgsql VOLATILE AS $fn$
-- The one write of an event (the outbox): the user's next seq, taken from the account row, and
-- the event row, in the caller's transaction. Updating the counter locks the account until the
-- transaction ends, so a user's seqs are gap-free and commit in seq order (a later seq waits for
-- the transaction holding the earlier one). Events are written by: every ledger entry's trigger
-- (tokens_entry_event), the alerts' check at commit (tokens_alerts); a spend limit's
-- limit.reached calls it too (p_user: the account the limit is set on).
DECLARE
    v_seq bigint;
    v_id bigint;
BEGIN
    UPDATE accounts SET events_seq = events_seq + 1 WHERE user_id = p_user
    RETURNING events_seq INTO v_seq;
    IF v_seq IS NULL THEN
        RAISE EXCEPTION 'tokens_event: no account %', p_user;
    END IF;
    INSERT INTO events (user_id, seq, type, at, data, entry_id)
    VALUES (p_user, v_seq, p_type, coalesce(p_at, clock_timestamp()), p_data, p_entry)
    RETURNING id INTO v_id;
    RETURN v_id;
END
$fn$;
