"""The renewal's statements: pages of due users in sweep order, and the one statement that
renews a set of locked users (:data:`RENEW`): the one definition of what a renewal does.

A renewal grants the tier's allocation as an ``allowance`` that pays the user's debt first; under
a tier's ``reset`` policy it first ends the previous allowance and rollover (one ``expiry``
entry, keeping up to ``rollover_max`` as a rollover). Every renewing statement carries the rule
as its guard, so however many sweeps and ``renew_user`` calls race, a user is renewed at most
once per period: a second UPDATE finds the row no longer due.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    text,
)
from sqlalchemy.orm import Session

from accounting.renewals.rule import KIND, OPERATION, PRIORITY, TierPlan

# --- pages of due users -----------------------------------------------------------------------


class Phase(enum.Enum):
    """Due users are visited never-renewed first (by user_id), then by oldest renewal."""

    NEVER = "never"
    LAPSED = "lapsed"


@dataclass(frozen=True)
class Key:
    """Keyset position: a (last_renewal_at, user_id) in a phase's sweep order."""

    user_id: str = ""  # sorts before every user_id (they are never empty)
    renewed_at: datetime = datetime(1, 1, 1, tzinfo=UTC)


Page = Sequence[tuple[str, datetime | None]]


# PostgreSQL. Tiers travel as arrays, so the statement text depends only on which tiers are
# swept. The guard: every renewing statement carries it, so a user renewed meanwhile (committed
# by another transaction, seen here after waiting for its row lock) is left alone.
_TIERS = """tiers AS (
    SELECT * FROM unnest(
        CAST(:tier_names AS text[]), CAST(:allocations AS bigint[]),
        CAST(:cutoffs AS timestamptz[]), CAST(:paid AS boolean[]), CAST(:resets AS boolean[]),
        CAST(:rollover_maxes AS bigint[]), CAST(:ends AS timestamptz[])
    ) AS t(tier, allocation, cutoff, paid, resets, rollover_max, ends)
)"""
_NOT_EXPIRED = (
    "(NOT t.paid OR a.subscription_expires_at IS NULL OR a.subscription_expires_at > :now)"
)
_GUARD = f"(a.last_renewal_at IS NULL OR a.last_renewal_at < t.cutoff) AND {_NOT_EXPIRED}"
_ORDER_DESC = "last_renewal_at DESC, user_id DESC"


def _page_cte(phase: Phase, plans: dict[str, TierPlan], bounded: bool = False) -> str:
    """The next page of due users after ``:after_*`` (and, ``bounded``, up to ``:upto_*``
    inclusive), with where their rows are; locks nothing.

    One branch per tier, each an index range scan on ix_accounts_tier_last_renewal (tier,
    last_renewal_at, user_id) already in sweep order, merged (Merge Append): a page reads about
    ``n`` index entries, where an OR across tiers would scan and sort the table for every page.
    In the NEVER phase last_renewal_at is NULL throughout, so the order is user_id order.
    """
    branches = []
    for i, plan in enumerate(plans.values()):
        if phase is Phase.NEVER:
            where = "a.last_renewal_at IS NULL AND a.user_id > :after_user"
            if bounded:
                where += " AND a.user_id <= :upto_user"
        else:
            where = (
                f"a.last_renewal_at < :cutoff_{i} AND (a.last_renewal_at, a.user_id)"
                " > (CAST(:after_time AS timestamptz), :after_user)"
            )
            if bounded:
                where += (
                    " AND (a.last_renewal_at, a.user_id)"
                    " <= (CAST(:upto_time AS timestamptz), :upto_user)"
                )
        if plan.paid:
            where += " AND (a.subscription_expires_at IS NULL OR a.subscription_expires_at > :now)"
        branches.append(
            f"""(SELECT a.user_id, a.last_renewal_at, a.ctid FROM accounts a
        WHERE a.tier = :tier_{i} AND {where}
        ORDER BY a.last_renewal_at, a.user_id LIMIT :n)"""
        )
    union = "\n    UNION ALL\n    ".join(branches)
    return f"""page AS (
    SELECT * FROM (
    {union}
    ) AS due
    ORDER BY last_renewal_at, user_id
    LIMIT :n
)"""


def _range_sql(phase: Phase, plans: dict[str, TierPlan]) -> str:
    """The size and last key of the next page: what planning a chunk needs, and no more."""
    return f"""WITH {_page_cte(phase, plans)}
SELECT (SELECT count(*) FROM page) AS scanned, k.user_id AS last_user,
       k.last_renewal_at AS last_time
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (SELECT * FROM page ORDER BY {_ORDER_DESC} LIMIT 1) k ON true"""


# The locked rows: the account as it is now (the lock re-reads it), and the write time, read
# around the locking query so that it is taken once the row is held (see grants.lock).
_LOCKED_COLUMNS = "a.user_id, a.tier, a.debt, a.updated_at"
_STAMPED = "h.user_id, h.tier, h.debt, GREATEST(clock_timestamp(), h.updated_at) AS at"

# What a renewal does, set-based over the locked users: the one definition of the rule. Under
# the ``reset`` policy the users' previous allowance and rollover grants are locked (account
# first, then its grants; expired ones never come back, so they are left alone) and re-read:
# the statement's snapshot may predate a movement its lock waited for, the lock gives the
# current rows. ``ending``: per user, what is left of them (less what reservations hold), and
# of the allowances still running, which may roll over.
#
# Linear in the chunk: no CTE is joined to another on user_id (the planner, blind to their
# sizes, would loop over one for each row of the other). ``candidates`` gathers each locked
# user's account and grant figures with UNION ALL and GROUP BY, the UPDATE looks accounts up by
# key, and what follows reads ``renewed`` alone: the ids of the grants and entries it makes are
# drawn in its RETURNING (an expiry entry's id before its monthly_reset's, a rollover's before
# its allowance's: entries chain, and grants burn, in id order among equals), the old grants'
# ids travel in arrays.
#
# The write time of a renewal: the database's clock under the row lock, never before the
# account's previous change (accounting.clock.stamp), and the entries' created_at is that value.
RENEW = f"""previous AS (
    SELECT g.id, g.user_id, g.kind, g.remaining, g.held, g.expires_at, g.status, l.at
    FROM grants g JOIN locked l ON g.user_id = l.user_id JOIN tiers t ON t.tier = l.tier
    WHERE t.resets AND g.kind IN ('allowance', 'rollover') AND g.status <> 'expired'
    FOR UPDATE OF g
),
ending AS (
    SELECT user_id, CAST(sum(remaining - held) AS bigint) AS expired,
           CAST(COALESCE(sum(remaining - held) FILTER (
               WHERE kind = 'allowance' AND (expires_at IS NULL OR expires_at > at)
           ), 0) AS bigint) AS base,
           array_agg(id ORDER BY id) AS ended_ids,
           array_agg(id ORDER BY id) FILTER (WHERE remaining > held) AS ids,
           array_agg(remaining - held ORDER BY id) FILTER (WHERE remaining > held) AS lefts
    FROM previous WHERE status = 'active' GROUP BY user_id
),
candidates AS (
    SELECT user_id, max(debt) AS debt, max(expired) AS expired, max(base) AS base,
           max(ended_ids) AS ended_ids, max(ids) AS ids, max(lefts) AS lefts
    FROM (
        SELECT user_id, debt, CAST(NULL AS bigint) AS expired, CAST(NULL AS bigint) AS base,
               CAST(NULL AS bigint[]) AS ended_ids, CAST(NULL AS bigint[]) AS ids,
               CAST(NULL AS bigint[]) AS lefts
        FROM locked
        UNION ALL
        SELECT user_id, NULL, expired, base, ended_ids, ids, lefts FROM ending
    ) AS u
    GROUP BY user_id
),
renewed AS (
    UPDATE accounts a
    SET tokens_balance = a.tokens_balance + t.allocation
            - COALESCE(c.expired, 0) + LEAST(COALESCE(c.base, 0), t.rollover_max),
        debt = a.debt - LEAST(a.debt, t.allocation),
        last_renewal_at = :now,
        updated_at = GREATEST(clock_timestamp(), a.updated_at)
    FROM candidates c, tiers t
    WHERE a.user_id = c.user_id AND a.tier = t.tier AND {_GUARD}
    RETURNING a.user_id, a.tier, a.tokens_balance, a.tokens_reserved, t.allocation, a.updated_at,
        LEAST(c.debt, t.allocation) AS paid, COALESCE(c.expired, 0) AS expired,
        LEAST(COALESCE(c.base, 0), t.rollover_max) AS rolled, c.ended_ids, c.ids, c.lefts,
        t.ends,
        CASE WHEN COALESCE(c.expired, 0) > 0 THEN nextval('ledger_entries_id_seq') END
            AS expiry_id,
        nextval('ledger_entries_id_seq') AS reset_id,
        CASE WHEN LEAST(COALESCE(c.base, 0), t.rollover_max) > 0 THEN nextval('grants_id_seq')
        END AS rollover_id,
        CASE WHEN t.allocation > 0 THEN nextval('grants_id_seq') END AS allowance_id
),
ended AS (
    UPDATE grants g
    SET remaining = g.held, expired = g.expired + g.remaining - g.held,
        status = CASE WHEN g.held = 0 THEN 'expired' ELSE g.status END,
        ended_at = CASE WHEN g.held = 0 THEN r.updated_at ELSE g.ended_at END,
        expires_at = LEAST(COALESCE(g.expires_at, r.updated_at), r.updated_at)
    FROM renewed r CROSS JOIN LATERAL unnest(r.ended_ids) AS e(id)
    WHERE g.id = e.id
    RETURNING g.id
),
made AS (
    INSERT INTO grants (id, user_id, kind, amount, remaining, held, spent, expired, returned,
                        priority, expires_at, status, created_at, ended_at)
    SELECT id, user_id, kind, amount, amount - paid, 0, paid, 0, 0, {PRIORITY}, ends,
           CASE WHEN amount > paid THEN 'active' ELSE 'depleted' END, updated_at,
           CASE WHEN amount > paid THEN NULL ELSE updated_at END
    FROM (
        SELECT rollover_id AS id, user_id, 'rollover' AS kind, rolled AS amount, 0 AS paid,
               ends, updated_at
        FROM renewed WHERE rolled > 0
        UNION ALL
        SELECT allowance_id, user_id, 'allowance', allocation, paid, ends, updated_at
        FROM renewed WHERE allocation > 0
    ) AS n
    RETURNING id
),
entries AS (
    INSERT INTO ledger_entries
        (id, user_id, kind, operation_type, tokens_amount, balance_before, balance_after,
         metadata, created_at)
    SELECT id, user_id, kind, operation_type, amount, before, before + amount, meta, updated_at
    FROM (
        SELECT expiry_id AS id, user_id, 'expiry' AS kind, 'expiry' AS operation_type,
               rolled - expired AS amount,
               tokens_balance - allocation - (rolled - expired) AS before,
               jsonb_build_object(
                   'grant_id', CAST(ids[1] AS text), 'grant_ids', to_jsonb(CAST(ids AS text[])),
                   'reason', 'renewal'
               ) AS meta, updated_at
        FROM renewed WHERE expired > 0
        UNION ALL
        SELECT reset_id, user_id, :kind, :operation, allocation, tokens_balance - allocation,
               jsonb_build_object('tier', tier, 'source', CAST(:source AS text)), updated_at
        FROM renewed
    ) AS e
    RETURNING id
),
splits AS (
    INSERT INTO entry_grants (entry_id, grant_id, amount, seq)
    SELECT r.expiry_id, e.id, -e."left", CAST(e.n - 1 AS integer)
    FROM renewed r CROSS JOIN LATERAL unnest(r.ids, r.lefts) WITH ORDINALITY AS e(id, "left", n)
    WHERE r.expired > 0
    UNION ALL
    SELECT expiry_id, rollover_id, rolled, cardinality(ids) FROM renewed WHERE rolled > 0
    UNION ALL
    SELECT reset_id, allowance_id, allocation - paid, 0 FROM renewed WHERE allocation > 0
    RETURNING entry_id
)"""
_CHANGES = """CASE WHEN :with_changes THEN (
    SELECT json_agg(json_build_array(user_id, tokens_balance, tokens_reserved)) FROM renewed
) END"""
# Users renewed per tier, for the tally's renewals_counted (metrics by tier).
_BY_TIER = """(SELECT json_object_agg(tier, n) FROM (
    SELECT tier, count(*) AS n FROM renewed GROUP BY tier
) AS per_tier)"""


def chunk_sql(phase: Phase, plans: dict[str, TierPlan]) -> str:
    """Renew one chunk's range in one statement. Rows another transaction holds (a debit in
    flight, another sweep) are skipped, not waited for, and come back as ``contested``.

    The lock finds the page's rows by ctid (no index descent); the UPDATE still finds them by
    user_id, so a row changed since the page was read is re-read and re-checked against the
    guard (READ COMMITTED's recheck), never updated from a stale version nor silently missed.
    """
    return f"""WITH {_TIERS}, {_page_cte(phase, plans, bounded=True)},
locked AS (
    SELECT {_STAMPED} FROM (
        SELECT {_LOCKED_COLUMNS} FROM accounts a WHERE a.ctid = ANY(ARRAY(SELECT ctid FROM page))
        FOR UPDATE OF a SKIP LOCKED
    ) h
),
{RENEW}
SELECT
    (SELECT count(*) FROM page) AS scanned,
    (SELECT count(*) FROM renewed) AS renewed,
    (SELECT array_agg(p.user_id) FROM page p
     WHERE p.user_id NOT IN (SELECT user_id FROM locked)) AS contested,
    {_CHANGES} AS changes,
    {_BY_TIER} AS by_tier"""


# The contested rows of a chunk, waited for: locked in user_id order (as every sweep does, so
# two sweeps cannot deadlock), then renewed only if still due once their holder has finished.
CONTESTED_SQL = f"""WITH {_TIERS},
locked AS (
    SELECT {_STAMPED} FROM (
        SELECT {_LOCKED_COLUMNS} FROM accounts a
        WHERE a.user_id = ANY(CAST(:contested AS text[]))
        ORDER BY a.user_id
        FOR UPDATE OF a
    ) h
),
{RENEW}
SELECT (SELECT count(*) FROM renewed) AS renewed, {_CHANGES} AS changes, {_BY_TIER} AS by_tier"""


def expire_page_sql(phase: Phase, plans: dict[str, TierPlan]) -> str:
    """Before a chunk's renewals, as before any movement, the due grants of the page's users
    leave (``tokens_lock``: the lock, then ``tokens_expire_due``): rows another transaction
    holds are skipped here, as the chunk's statement skips them, and stay locked by this
    transaction for it. The users whose grants expired, with what the expiry left."""
    return f"""WITH {_TIERS}, {_page_cte(phase, plans, bounded=True)},
locked AS (
    SELECT a.user_id FROM accounts a WHERE a.ctid = ANY(ARRAY(SELECT ctid FROM page))
    ORDER BY a.user_id
    FOR UPDATE OF a SKIP LOCKED
)
SELECT l.user_id, x.reserved, x.expired_tokens, x.expired_balances
FROM locked l CROSS JOIN LATERAL tokens_lock(l.user_id) x
WHERE cardinality(x.expired_tokens) > 0"""


# The same for the contested users, waited for in user order.
EXPIRE_CONTESTED_SQL = """SELECT c.u, x.reserved, x.expired_tokens, x.expired_balances
FROM (SELECT u FROM unnest(CAST(:contested AS text[])) AS u ORDER BY u) c
CROSS JOIN LATERAL tokens_lock(c.u) x
WHERE cardinality(x.expired_tokens) > 0"""


# One user (renew_user, and a failed chunk's users one by one): the chunk's statement, on one
# locked row, waiting for its lock as a movement would.
ONE_SQL = f"""WITH {_TIERS},
locked AS (
    SELECT {_STAMPED} FROM (
        SELECT {_LOCKED_COLUMNS} FROM accounts a WHERE a.user_id = :user_id FOR UPDATE OF a
    ) h
),
{RENEW}
SELECT tier, allocation, tokens_balance, tokens_reserved, expired, rolled FROM renewed"""


def statement_params(
    plans: dict[str, TierPlan],
    now: datetime,
    after: Key | None = None,
    n: int | None = None,
    upto: Key | None = None,
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "tier_names": [p.name for p in plans.values()],
        "allocations": [p.allocation for p in plans.values()],
        "cutoffs": [p.cutoff for p in plans.values()],
        "paid": [p.paid for p in plans.values()],
        "resets": [p.resets for p in plans.values()],
        "rollover_maxes": [p.rollover_max for p in plans.values()],
        "ends": [p.ends for p in plans.values()],
        "now": now,
        "kind": KIND,
        "operation": OPERATION,
        "source": "sweep",
    }
    if after is not None:
        params |= {"after_user": after.user_id, "after_time": after.renewed_at, "n": n}
        for i, plan in enumerate(plans.values()):
            params |= {f"tier_{i}": plan.name, f"cutoff_{i}": plan.cutoff}
    if upto is not None:
        params |= {"upto_user": upto.user_id, "upto_time": upto.renewed_at}
    return params


def due_page(
    session: Session,
    plans: dict[str, TierPlan],
    phase: Phase,
    after: Key,
    n: int,
    now: datetime,
    upto: Key | None = None,
) -> Page:
    """The next ``n`` due users of ``phase`` after ``after`` (up to ``upto``, inclusive), in
    sweep order; locks nothing."""
    sql = f"WITH {_page_cte(phase, plans, bounded=upto is not None)}"
    sql += " SELECT user_id, last_renewal_at FROM page ORDER BY last_renewal_at, user_id"
    rows = session.execute(text(sql), statement_params(plans, now, after, n, upto))
    return [(u, t) for u, t in rows]


def last_key(page: Page, phase: Phase, default: Key) -> Key:
    if not page:
        return default
    user_id, renewed_at = page[-1]
    return Key(user_id, renewed_at) if phase is Phase.LAPSED and renewed_at else Key(user_id)


def next_range(
    session: Session, plans: dict[str, TierPlan], phase: Phase, after: Key, n: int, now: datetime
) -> tuple[int, Key]:
    """How many of the next ``n`` due users there are after ``after``, and the last one's key."""
    row = session.execute(
        text(_range_sql(phase, plans)), statement_params(plans, now, after, n)
    ).one()
    if row.last_user is None:
        return 0, after
    return row.scanned, Key(row.last_user, row.last_time or Key.renewed_at)
