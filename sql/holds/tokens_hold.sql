CREATE OR REPLACE FUNCTION tokens_hold(
    p_user text, p_reservation text, p_amount bigint, p_now timestamptz
) RETURNS void LANGUAGE plpgsql VOLATILE AS $fn$
-- Hold p_amount of the user's free tokens for a reservation: the live grants' free tokens in
-- burn order (a grant it holds already holds more), counted in tokens_reserved. The account is
-- locked and the caller has checked the available tokens, which leave the free ones enough.
DECLARE
    v_left bigint := p_amount;
    v_take bigint;
    g record;
BEGIN
    FOR g IN
        SELECT f.id, f.free FROM tokens_free_grants(p_user, p_now) f ORDER BY f.burn_rank
    LOOP
        v_take := least(g.free, v_left);
        UPDATE grants SET held = held + v_take WHERE id = g.id;
        INSERT INTO reservation_grants AS rg (reservation_id, grant_id, amount)
        VALUES (p_reservation, g.id, v_take)
        ON CONFLICT (reservation_id, grant_id) DO UPDATE SET amount = rg.amount + v_take;
        v_left := v_left - v_take;
        EXIT WHEN v_left = 0;
    END LOOP;
    IF v_left > 0 THEN
        RAISE EXCEPTION 'hold of % beyond the free tokens', p_amount;
    END IF;
    UPDATE accounts SET tokens_reserved = tokens_reserved + p_amount, updated_at = p_now
    WHERE user_id = p_user;
END
$fn$;
