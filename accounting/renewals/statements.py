"""The renewal's statements: pages of due users in sweep order, and the statements that lock a
set of them and renew each through ``tokens_renew`` (sql/renewals/tokens_renew.sql), the one
definition of what a renewal does and of its guard: however many sweeps and ``renew_user`` calls
race, a user is renewed at most once per period.
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

from accounting.renewals.rule import PRIORITY, TierPlan

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


# Tiers travel as arrays, so the statement text depends only on which tiers are swept.
_TIERS = """tiers AS (
    SELECT * FROM unnest(
        CAST(:tier_names AS text[]), CAST(:allocations AS bigint[]),
        CAST(:cutoffs AS timestamptz[]), CAST(:paid AS boolean[]), CAST(:resets AS boolean[]),
        CAST(:rollover_maxes AS bigint[]), CAST(:ends AS timestamptz[])
    ) AS t(tier, allocation, cutoff, paid, resets, rollover_max, ends)
)"""
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
        # Members of a pool (contract v1.2) are never due: the pool is renewed.
        where += " AND a.parent_id IS NULL"
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


# What a renewal does is tokens_renew (sql/renewals/tokens_renew.sql), called for each locked
# user with their tier's plan; it re-checks the guard under the lock, so a user renewed
# meanwhile (by another transaction, seen once its lock was granted) is left alone.
_RENEWED = f"""renewed AS (
    SELECT l.user_id, l.tier, t.allocation, r.*
    FROM locked l JOIN tiers t ON t.tier = l.tier
    CROSS JOIN LATERAL tokens_renew(
        l.user_id, t.tier, t.allocation, t.cutoff, t.paid, t.resets, t.rollover_max, t.ends,
        {PRIORITY}, :now, :source
    ) r
    WHERE r.renewed
)"""
# What the caller notes as events: each renewed user's balance after (when someone listens), and
# the due grants' expiries tokens_lock wrote before the renewal (always: they are counted).
_CHANGES = """CASE WHEN :with_changes THEN (
    SELECT json_agg(json_build_array(user_id, balance, reserved)) FROM renewed
) END"""
_EXPIRIES = """(SELECT json_agg(json_build_array(
    user_id, reserved, expired_tokens, expired_balances
)) FROM renewed WHERE cardinality(expired_tokens) > 0)"""
# Users renewed per tier, for the tally's renewals_counted (metrics by tier).
_BY_TIER = """(SELECT json_object_agg(tier, n) FROM (
    SELECT tier, count(*) AS n FROM renewed GROUP BY tier
) AS per_tier)"""


def chunk_sql(phase: Phase, plans: dict[str, TierPlan]) -> str:
    """Renew one chunk's range in one statement. Rows another transaction holds (a debit in
    flight, another sweep) are skipped, not waited for, and come back as ``contested``.

    The lock finds the page's rows by ctid (no index descent); tokens_renew re-reads each row
    under its lock and re-checks the guard, so a row changed since the page was read is never
    renewed from a stale version.
    """
    return f"""WITH {_TIERS}, {_page_cte(phase, plans, bounded=True)},
locked AS (
    SELECT a.user_id, a.tier FROM accounts a WHERE a.ctid = ANY(ARRAY(SELECT ctid FROM page))
    ORDER BY a.user_id
    FOR UPDATE OF a SKIP LOCKED
),
{_RENEWED}
SELECT
    (SELECT count(*) FROM page) AS scanned,
    (SELECT count(*) FROM renewed) AS renewed,
    (SELECT array_agg(p.user_id) FROM page p
     WHERE p.user_id NOT IN (SELECT user_id FROM locked)) AS contested,
    {_CHANGES} AS changes,
    {_EXPIRIES} AS expiries,
    {_BY_TIER} AS by_tier"""


# The contested rows of a chunk, waited for: locked in user_id order (as every sweep does, so
# two sweeps cannot deadlock), then renewed only if still due once their holder has finished.
CONTESTED_SQL = f"""WITH {_TIERS},
locked AS (
    SELECT a.user_id, a.tier FROM accounts a
    WHERE a.user_id = ANY(CAST(:contested AS text[]))
    ORDER BY a.user_id
    FOR UPDATE OF a
),
{_RENEWED}
SELECT (SELECT count(*) FROM renewed) AS renewed, {_CHANGES} AS changes,
    {_EXPIRIES} AS expiries, {_BY_TIER} AS by_tier"""


# One user (renew_user, and a failed chunk's users one by one), waiting for its lock as a
# movement would.
ONE_SQL = f"""WITH {_TIERS},
locked AS (SELECT a.user_id, a.tier FROM accounts a WHERE a.user_id = :user_id FOR UPDATE OF a),
{_RENEWED}
SELECT * FROM renewed"""


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
