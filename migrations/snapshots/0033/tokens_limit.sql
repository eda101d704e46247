CREATE OR REPLACE FUNCTION tokens_limit(
    p_pool text, p_spender text, p_limited boolean, p_amount bigint, p_at timestamptz,
    p_hold bigint, p_now timestamptz, p_check boolean
) RETURNS jsonb LANGUAGE plpgsql VOLATILE AS $fn$
-- The one home of spend limits in a movement of p_spender (a member of p_pool, or the pool
-- itself; p_limited: some account of the pool has a limit), called with the pool's row
-- locked, so every window of the tree changes under that one lock. It decides, then counts:
-- - p_check (a debit, charge, reserve or extend): the first limit, in tokens.limits' order,
--   that p_amount spent plus p_hold held more would take past max_tokens refuses it: returned
--   (as listed, used before the request), and nothing is counted;
-- - else p_amount is counted as spent at p_at, in the window holding p_at (negative: a refund
--   of an entry made at p_at gives back what it counted, if that bucket is still kept), and
--   p_hold as held by the spender and the accounts above it (a pool's holds are its
--   tokens_reserved, which the caller moves). Members' holds are counted limited or not.
-- A movement that takes a window's used from below max_tokens to it (or past it: a capture)
-- writes limit.reached (tokens_event) for the account the limit is set on, once per window
-- and limit (spend_limits.reached_at: the window's first bucket when it was last written).
DECLARE
    v_requested bigint := greatest(p_amount, 0) + greatest(p_hold, 0);
    v_users text[] := '{}';
    v_grains text[] := '{}';
    v_los timestamptz[] := '{}';
    v_reached jsonb[] := '{}';
    v_reaches boolean;
    v_listed jsonb;
    v record;
BEGIN
    IF p_limited THEN
        FOR v IN SELECT * FROM tokens_limits(p_spender, p_now, v_requested, false) LOOP
            -- p_amount + p_hold: what used moves by (a capture's spend replaces its hold).
            v_reaches := v.used < v.max_tokens AND v.used + p_amount + p_hold >= v.max_tokens;
            IF (p_check AND v.refuses) OR v_reaches THEN
                -- The listing of this one limit, read as the loop read it: nothing has counted
                -- yet, and the pool's lock keeps every window of the tree as it was.
                SELECT t.listed INTO v_listed
                FROM tokens_limits(p_spender, p_now, v_requested) t
                WHERE t.user_id = v.user_id AND t.name = v.name;
            END IF;
            IF p_check AND v.refuses THEN
                RETURN v_listed;
            END IF;
            v_users := v_users || v.user_id;
            v_grains := v_grains || v.grain;
            v_los := v_los || v.lo;
            IF v_reaches THEN
                v_reached := v_reached || jsonb_build_object(
                    'name', v.name, 'lo', v.lo,
                    'limit', v_listed || jsonb_build_object(
                        'used', v.used + p_amount + p_hold,
                        'remaining', greatest(v.max_tokens - v.used - p_amount - p_hold, 0)));
            END IF;
        END LOOP;
        IF p_amount > 0 THEN
            -- One upsert for every bucket the spend lands in; a bucket made new prunes its
            -- account's buckets of that width older than every window reading them.
            WITH counted AS (
                INSERT INTO limit_buckets AS b (user_id, grain, bucket, tokens)
                SELECT c.u, c.g, tokens_bucket(c.g, p_at), p_amount
                FROM unnest(v_users, v_grains) AS c(u, g) GROUP BY c.u, c.g
                ON CONFLICT (user_id, grain, bucket) DO UPDATE SET tokens = b.tokens + p_amount
                RETURNING b.user_id, b.grain, b.xmax = 0 AS made
            )
            DELETE FROM limit_buckets b
            USING counted n, (SELECT c.u, c.g, min(c.lo) AS lo
                              FROM unnest(v_users, v_grains, v_los) AS c(u, g, lo)
                              GROUP BY c.u, c.g) w
            WHERE n.made AND w.u = n.user_id AND w.g = n.grain
              AND b.user_id = n.user_id AND b.grain = n.grain AND b.bucket < w.lo;
        ELSIF p_amount < 0 THEN
            UPDATE limit_buckets b SET tokens = b.tokens + p_amount
            FROM (SELECT DISTINCT c.u, c.g FROM unnest(v_users, v_grains) AS c(u, g)) w
            WHERE b.user_id = w.u AND b.grain = w.g AND b.bucket = tokens_bucket(w.g, p_at);
        END IF;
    END IF;
    FOR i IN 1 .. cardinality(v_reached) LOOP
        UPDATE spend_limits l SET reached_at = CAST(v_reached[i]->>'lo' AS timestamptz)
        WHERE l.user_id = v_reached[i]->'limit'->>'user_id' AND l.name = v_reached[i]->>'name'
          AND l.reached_at IS DISTINCT FROM CAST(v_reached[i]->>'lo' AS timestamptz);
        IF FOUND THEN
            PERFORM tokens_event(v_reached[i]->'limit'->>'user_id', 'limit.reached',
                                 v_reached[i]->'limit', p_now);
        END IF;
    END LOOP;
    IF p_hold <> 0 AND p_spender <> p_pool THEN
        UPDATE accounts a SET subtree_held = a.subtree_held + p_hold
        WHERE a.user_id IN (p_spender, (SELECT m.parent_id FROM accounts m
                                        WHERE m.user_id = p_spender))
          AND a.user_id <> p_pool;
    END IF;
    RETURN NULL;
END
$fn$;
