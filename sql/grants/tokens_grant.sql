CREATE OR REPLACE FUNCTION tokens_grant(
    p_user text, p_kind text, p_amount bigint, p_priority integer, p_expires_at timestamptz,
    p_debt bigint, p_now timestamptz, OUT grant_id bigint, OUT kept bigint
) LANGUAGE plpgsql VOLATILE AS $fn$
-- A new grant of p_amount that pays the debt first: kept is what it keeps (its split).
#variable_conflict use_column
BEGIN
    kept := p_amount - least(p_debt, p_amount);
    INSERT INTO grants (user_id, kind, amount, remaining, held, spent, expired, returned,
                        priority, expires_at, status, created_at, ended_at)
    VALUES (p_user, p_kind, p_amount, kept, 0, p_amount - kept, 0, 0, p_priority, p_expires_at,
            CASE WHEN kept > 0 THEN 'active' ELSE 'depleted' END, p_now,
            CASE WHEN kept > 0 THEN NULL ELSE p_now END)
    RETURNING id INTO grant_id;
END
$fn$;
