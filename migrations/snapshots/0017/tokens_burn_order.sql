CREATE OR REPLACE FUNCTION tokens_burn_order(
    p_priority integer, p_expires_at timestamptz, p_created_at timestamptz, p_id bigint,
    OUT priority integer, OUT never_ends boolean, OUT expires_at timestamptz,
    OUT created_at timestamptz, OUT id bigint
) LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $fn$
-- The burn order, defined once: a grant's sort key, compared field by field: priority, then the
-- earliest end (a grant that never ends after every one that does), then creation, then id.
-- Every ordering of grants in burn order sorts by it: tokens_free_grants (burns and holds), a
-- capture's held grants, the list of a user's grants (tokens.grants).
    SELECT p_priority, p_expires_at IS NULL, p_expires_at, p_created_at, p_id
$fn$;
