CREATE OR REPLACE FUNCTION tokens_lock(
    p_user text,
    OUT balance bigint, OUT reserved bigint, OUT spent bigint, OUT debt bigint,
    OUT moment timestamptz, OUT expired_tokens bigint[], OUT expired_balances bigint[],
    OUT pool text, OUT limited boolean
) LANGUAGE plpgsql VOLATILE AS $fn$
-- The lock of the account that holds p_user's balance: its pool (p_user itself unless it is a
-- member; a member's pool is fixed when it is opened, so it is found without a lock). Then the
-- movement's time, read once the lock is held (moment NULL: no such account), and the pool's
-- due grants' expiry (tokens_expire_due). limited: some account of the pool has a spend limit.
-- The pool's row is the first account row a movement locks; members' rows come after it.
#variable_conflict use_column
BEGIN
    expired_tokens := '{}';
    expired_balances := '{}';
    SELECT l.user_id, l.tokens_balance, l.tokens_reserved, l.tokens_spent, l.debt, l.limited,
           greatest(clock_timestamp(), l.updated_at)
    INTO pool, balance, reserved, spent, debt, limited, moment
    FROM (SELECT a.user_id, a.tokens_balance, a.tokens_reserved, a.tokens_spent, a.debt,
                 a.limited, a.updated_at
          FROM accounts a
          WHERE a.user_id = (SELECT coalesce(m.pool_id, m.user_id) FROM accounts m
                             WHERE m.user_id = p_user)
          FOR UPDATE) l;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT e.tokens, e.balances INTO expired_tokens, expired_balances
    FROM tokens_expire_due(pool, moment) e;
    IF cardinality(expired_balances) > 0 THEN
        balance := expired_balances[cardinality(expired_balances)];
    END IF;
END
$fn$;
