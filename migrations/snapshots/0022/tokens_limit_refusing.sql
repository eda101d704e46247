CREATE OR REPLACE FUNCTION tokens_limit_refusing(p_user text, p_requested bigint)
RETURNS jsonb LANGUAGE sql STABLE AS $fn$
-- The limit that would refuse p_requested spent by p_user now (its pool's clock), as listed,
-- or NULL: tokens.can_afford's answer, by the test movements make (tokens_limits).
    SELECT l.listed
    FROM tokens_limits(p_user, NULL, p_requested) WITH ORDINALITY
         AS l(user_id, name, max_tokens, used, grain, lo, refuses, listed, n)
    WHERE l.refuses
    ORDER BY l.n
    LIMIT 1
$fn$;
