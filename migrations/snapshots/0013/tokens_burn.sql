CREATE OR REPLACE FUNCTION tokens_burn(
    p_user text, p_amount bigint, p_now timestamptz,
    OUT gids bigint[], OUT amounts bigint[], OUT uncovered bigint
) LANGUAGE plpgsql VOLATILE AS $fn$
-- Spend p_amount of the free tokens in burn order; the splits, and what no grant covered.
#variable_conflict use_column
DECLARE
    v_take bigint;
    g record;
BEGIN
    gids := '{}';
    amounts := '{}';
    uncovered := p_amount;
    IF p_amount = 0 THEN
        RETURN;
    END IF;
    FOR g IN
        SELECT f.id, f.free FROM tokens_free_grants(p_user, p_now) f ORDER BY f.burn_rank
    LOOP
        v_take := least(g.free, uncovered);
        UPDATE grants SET
            remaining = remaining - v_take,
            spent = grants.spent + v_take,
            status = CASE WHEN remaining = v_take THEN 'depleted' ELSE grants.status END,
            ended_at = CASE WHEN remaining = v_take THEN p_now ELSE ended_at END
        WHERE id = g.id;
        gids := gids || g.id;
        amounts := amounts || -v_take;
        uncovered := uncovered - v_take;
        EXIT WHEN uncovered = 0;
    END LOOP;
END
$fn$;
