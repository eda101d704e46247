CREATE OR REPLACE FUNCTION tokens_ledger_partitions(
    OUT name text, OUT lower timestamptz, OUT upper timestamptz
) RETURNS SETOF record LANGUAGE sql STABLE AS $fn$
-- The ledger's partitions (of ledger_entries; entry_grants has the same months under the same
-- suffixes), oldest first, as tokens_partitions lists them.
SELECT * FROM tokens_partitions('ledger_entries')
$fn$;
