"""Renewals: each tier's allocation every ``period_days``, counted in whole UTC days.

A user is due when ``utc_date(now) >= utc_date(last_renewal_at) + period_days`` (or was never
renewed), i.e. when ``last_renewal_at < cutoff`` with ``cutoff = utc_midnight(now) - (period - 1)
days``; so a user renewed at 02:00:05 by one daily sweep is due again at the sweep 30 days later at
02:00:01, and the schedule never drifts. Paid tiers (all but ``FREE_TIERS``) are not due once
``subscription_expires_at`` has passed.

Every renewal is a conditional UPDATE whose WHERE clause is that rule, with its ledger entry in
the same transaction: however many sweeps and ``renew_user`` calls race, a user is renewed at most
once per period because a second UPDATE finds the row no longer due.

Two instants, both from the database's clock (``accounting.clock``), never a worker's:

- ``now``, the eligibility instant, read once per decision (per sweep, per ``renew_user``). It is
  what ``last_renewal_at`` and ``renewal_date`` hold: the period a renewal belongs to. A sweep
  that runs past midnight therefore never pushes its last users' next renewal a day later.
- the write time: the account's ``updated_at`` is set to ``GREATEST(clock_timestamp(),
  updated_at)`` under the row lock, and the renewal entry takes its ``created_at`` from it, so a
  user's entries in ``created_at`` order are the order they were applied.

A renewal grants the tier's allocation as an ``allowance`` that pays the user's debt first; under
a tier's ``reset`` policy it first ends the previous allowance and rollover (one ``expiry``
entry, keeping up to ``rollover_max`` as a rollover). One statement (:data:`_RENEW`) does it for a
chunk of users or for one (``renew_user``).

``check_eligibility``, ``renew_user`` and ``due`` work in the caller's session and never commit.

The sweep fans out. ``plan_sweep`` fixes a sweep once (its instant, the tiers' cutoffs, and
chunks: keyset ranges over the due users in sweep order, one small page query per chunk); each
chunk (``run_chunk``) is one transaction that renews its range and writes its tally beside it, so
chunks may run anywhere, in any order, and more than once; ``sweep_totals`` sums the tallies.
``sweep`` runs the same three steps in-process (the operator CLI, tests).
"""

from __future__ import annotations

import enum
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    delete,
    false,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from accounting import clock, grants, idempotency, statements
from accounting.accounts import load_account
from accounting.catalog import FREE_TIERS, tier_of
from accounting.config import rules
from accounting.errors import not_due, subscription_expired
from accounting.events import balance_changed, note_balance_change, note_renewals
from accounting.idempotency import insert_ignoring_conflicts
from models.schemas import (
    DueOut,
    EligibilityOut,
    RenewOut,
    SweepChunkOut,
    SweepError,
    SweepOut,
)
from models.tables import Account, sweep_chunk_table, sweep_table

log = logging.getLogger(__name__)

KIND = "renewal"
OPERATION = "monthly_reset"
# Allowances and rollovers share one priority.
PRIORITY = grants.DEFAULT_PRIORITY["allowance"]
assert grants.DEFAULT_PRIORITY["rollover"] == PRIORITY
MAX_ERRORS_LISTED = 100
MAX_ERROR_LENGTH = 500
# Sweep plans and tallies are kept this long (a redelivered message is minutes old, not days).
SWEEP_RETENTION = timedelta(days=7)
# Under the reset policy, allowance and rollover grants end this long after the next renewal
# date, so they end even if no renewal comes (a lapsed subscription).
RESET_GRACE = timedelta(days=1)


# --- the rule ---------------------------------------------------------------------------------


def utc_midnight(moment: datetime) -> datetime:
    return datetime.combine(moment.astimezone(UTC).date(), time(), tzinfo=UTC)


def next_renewal_date(last_renewal_at: datetime, period_days: int) -> datetime:
    """UTC midnight of the first day the user is due again."""
    return utc_midnight(last_renewal_at) + timedelta(days=period_days)


def renewal_cutoff(now: datetime, period_days: int) -> datetime:
    """Due iff ``last_renewal_at < cutoff`` (or never renewed): the whole-UTC-day rule as one
    comparison the database can index."""
    return utc_midnight(now) - timedelta(days=period_days - 1)


@dataclass(frozen=True)
class TierPlan:
    """What a sweep at ``now`` does to users of one tier.

    ``renewal`` is the tier's policy (``add`` or ``reset``); under ``reset`` the allowance and
    rollover grants a renewal at ``now`` makes end at ``ends`` (the next renewal date + 1 day)
    and at most ``rollover_max`` of the previous allowance rolls over.
    """

    name: str
    allocation: int
    cutoff: datetime
    paid: bool
    renewal: str = "add"
    rollover_max: int = 0
    ends: datetime | None = None

    @property
    def resets(self) -> bool:
        return self.renewal == "reset"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "allocation": self.allocation,
            "cutoff": self.cutoff.isoformat(),
            "paid": self.paid,
            "renewal": self.renewal,
            "rollover_max": self.rollover_max,
            "ends": None if self.ends is None else self.ends.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TierPlan:
        # Plans stored before v1.1 carry no policy: "add".
        ends = data.get("ends")
        return cls(
            name=data["name"],
            allocation=data["allocation"],
            cutoff=datetime.fromisoformat(data["cutoff"]),
            paid=data["paid"],
            renewal=data.get("renewal", "add"),
            rollover_max=data.get("rollover_max", 0),
            ends=None if ends is None else datetime.fromisoformat(ends),
        )


def plans_at(now: datetime, tier: str | None = None) -> dict[str, TierPlan]:
    """The plan of every configured tier (or of ``tier`` only; unknown: VALIDATION_ERROR)."""
    tiers = rules().tiers
    names = list(tiers) if tier is None else [tier]
    plans = {}
    for name in names:
        config = tier_of(name)
        resets = config.renewal == "reset"
        plans[name] = TierPlan(
            name=name,
            allocation=config.tokens,
            cutoff=renewal_cutoff(now, config.period_days),
            paid=name not in FREE_TIERS,
            renewal=config.renewal,
            rollover_max=config.rollover_max if resets else 0,
            ends=next_renewal_date(now, config.period_days) + RESET_GRACE if resets else None,
        )
    return plans


def _expired(tier: str, subscription_expires_at: datetime | None, now: datetime) -> bool:
    return (
        tier not in FREE_TIERS
        and subscription_expires_at is not None
        and subscription_expires_at <= now
    )


def due_clause(plans: dict[str, TierPlan], now: datetime) -> ColumnElement[bool]:
    """The renewal guard as a WHERE clause over ``accounts`` (portable across dialects)."""
    if not plans:
        return false()
    not_expired = or_(
        Account.subscription_expires_at.is_(None), Account.subscription_expires_at > now
    )
    return or_(
        *(
            and_(
                Account.tier == plan.name,
                or_(Account.last_renewal_at.is_(None), Account.last_renewal_at < plan.cutoff),
                *([not_expired] if plan.paid else []),
            )
            for plan in plans.values()
        )
    )


def _instant(session: Session, now: datetime | None) -> datetime:
    """The eligibility instant: the database's clock, unless a caller simulates time."""
    return (now or clock.db_now(session)).astimezone(UTC)


# --- one user ---------------------------------------------------------------------------------


def check_eligibility(
    session: Session, user_id: str, now: datetime | None = None
) -> EligibilityOut:
    now = _instant(session, now)
    return _verdict(load_account(session, user_id), now)


def _verdict(account: Account, now: datetime) -> EligibilityOut:
    last = account.last_renewal_at
    next_date = None if last is None else next_renewal_date(last, tier_of(account.tier).period_days)
    days = 0 if next_date is None else max(0, (next_date.date() - now.date()).days)
    if _expired(account.tier, account.subscription_expires_at, now):
        eligible, reason = False, subscription_expired().message
    elif last is None:
        eligible, reason = True, "Never renewed"
    elif days == 0:
        eligible, reason = True, "Renewal due"
    else:
        eligible, reason = False, not_due(days).message
    return EligibilityOut(
        user_id=account.user_id,
        eligible=eligible,
        reason=reason,
        next_renewal_date=next_date,
        days_until_renewal=days,
    )


def renew_user(
    session: Session,
    user_id: str,
    now: datetime | None = None,
    idempotency_key: str | None = None,
) -> RenewOut:
    """Renew one user if due; refusals: USER_NOT_FOUND, SUBSCRIPTION_EXPIRED, NOT_DUE.

    With ``idempotency_key`` (the task id), a request already done returns its first result;
    a refusal rolls back with the caller's transaction, so it does not use up the key.
    """
    digest = idempotency.request_hash("renew_user")
    stored = idempotency.claim(session, user_id, idempotency_key, digest)
    if stored is not None:
        return RenewOut(**stored)
    now = _instant(session, now)
    out = _renew_one(session, user_id, plans_at(now), now, source="renew_user")
    if out is not None:
        idempotency.record(session, user_id, idempotency_key, out.model_dump(mode="json"))
        note_renewals(session, renewed={out.tier: 1}, tokens={out.tier: out.tokens_added})
        return out
    account = load_account(session, user_id)  # raises USER_NOT_FOUND
    if _expired(account.tier, account.subscription_expires_at, now):
        raise subscription_expired()
    raise not_due(_verdict(account, now).days_until_renewal)


def _renew_one(
    session: Session, user_id: str, plans: dict[str, TierPlan], now: datetime, source: str
) -> RenewOut | None:
    """One user renewed by the statement that renews a chunk (:data:`_ONE_SQL`), after their
    due grants are expired (``grants.lock_current``); None when not due (or unknown)."""
    due = select(Account.user_id).where(Account.user_id == user_id, due_clause(plans, now))
    if session.execute(due).first() is None:
        return None  # not due, or no such user: the caller tells which
    grants.lock_current(session, user_id)
    params = _params(plans, now) | {"user_id": user_id, "source": source}
    row = session.execute(text(_ONE_SQL), params).first()
    if row is None:
        return None
    note_balance_change(
        session,
        user_id=user_id,
        balance=row.tokens_balance,
        tokens_reserved=row.tokens_reserved,
        operation=KIND,
    )
    return RenewOut(
        user_id=user_id,
        tier=row.tier,
        tokens_added=row.allocation,
        previous_balance=row.tokens_balance - row.allocation - row.rolled + row.expired,
        new_balance=row.tokens_balance,
        renewal_date=now,
        tokens_expired=row.expired,
        tokens_rolled_over=row.rolled,
    )


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
_RENEW = f"""previous AS (
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


def _chunk_sql(phase: Phase, plans: dict[str, TierPlan]) -> str:
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
{_RENEW}
SELECT
    (SELECT count(*) FROM page) AS scanned,
    (SELECT count(*) FROM renewed) AS renewed,
    (SELECT array_agg(p.user_id) FROM page p
     WHERE p.user_id NOT IN (SELECT user_id FROM locked)) AS contested,
    {_CHANGES} AS changes,
    {_BY_TIER} AS by_tier"""


# The contested rows of a chunk, waited for: locked in user_id order (as every sweep does, so
# two sweeps cannot deadlock), then renewed only if still due once their holder has finished.
_CONTESTED_SQL = f"""WITH {_TIERS},
locked AS (
    SELECT {_STAMPED} FROM (
        SELECT {_LOCKED_COLUMNS} FROM accounts a
        WHERE a.user_id = ANY(CAST(:contested AS text[]))
        ORDER BY a.user_id
        FOR UPDATE OF a
    ) h
),
{_RENEW}
SELECT (SELECT count(*) FROM renewed) AS renewed, {_CHANGES} AS changes, {_BY_TIER} AS by_tier"""


def _expire_page_sql(phase: Phase, plans: dict[str, TierPlan]) -> str:
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
_EXPIRE_CONTESTED_SQL = """SELECT c.u, x.reserved, x.expired_tokens, x.expired_balances
FROM (SELECT u FROM unnest(CAST(:contested AS text[])) AS u ORDER BY u) c
CROSS JOIN LATERAL tokens_lock(c.u) x
WHERE cardinality(x.expired_tokens) > 0"""


# One user (renew_user, and a failed chunk's users one by one): the chunk's statement, on one
# locked row, waiting for its lock as a movement would.
_ONE_SQL = f"""WITH {_TIERS},
locked AS (
    SELECT {_STAMPED} FROM (
        SELECT {_LOCKED_COLUMNS} FROM accounts a WHERE a.user_id = :user_id FOR UPDATE OF a
    ) h
),
{_RENEW}
SELECT tier, allocation, tokens_balance, tokens_reserved, expired, rolled FROM renewed"""


def _params(
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


def _page(
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
    rows = session.execute(text(sql), _params(plans, now, after, n, upto))
    return [(u, t) for u, t in rows]


def _last_key(page: Page, phase: Phase, default: Key) -> Key:
    if not page:
        return default
    user_id, renewed_at = page[-1]
    return Key(user_id, renewed_at) if phase is Phase.LAPSED and renewed_at else Key(user_id)


def _next_range(
    session: Session, plans: dict[str, TierPlan], phase: Phase, after: Key, n: int, now: datetime
) -> tuple[int, Key]:
    """How many of the next ``n`` due users there are after ``after``, and the last one's key."""
    row = session.execute(text(_range_sql(phase, plans)), _params(plans, now, after, n)).one()
    if row.last_user is None:
        return 0, after
    return row.scanned, Key(row.last_user, row.last_time or Key.renewed_at)


def due(
    session: Session, tier: str | None = None, limit: int | None = None, now: datetime | None = None
) -> DueOut:
    """Due users in sweep order: never renewed first, then the oldest renewal."""
    now = _instant(session, now)
    plans = plans_at(now, tier)
    chunk = rules().sweep_chunk_size
    user_ids: list[str] = []
    for phase in Phase if plans else ():
        after = Key()
        while limit is None or len(user_ids) < limit:
            n = chunk if limit is None else min(chunk, limit - len(user_ids))
            page = _page(session, plans, phase, after, n, now)
            user_ids.extend(u for u, _ in page)
            if len(page) < n:
                break
            after = _last_key(page, phase, after)
    return DueOut(user_ids=user_ids)


# --- planning a sweep -------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """A chunk: the due users of ``phase`` after ``after`` up to ``upto`` (inclusive), of which
    there were ``planned`` when the sweep was planned."""

    phase: Phase
    after: Key
    upto: Key
    planned: int


def _ranges(
    session: Session,
    plans: dict[str, TierPlan],
    now: datetime,
    limit: int | None,
    chunk_size: int,
) -> Iterator[Range]:
    """The sweep's chunks in sweep order, covering the first ``limit`` due users, found with one
    page query per chunk (never more than a chunk's worth of rows in memory)."""
    total = 0
    for phase in Phase if plans else ():
        after = Key()
        while limit is None or total < limit:
            n = chunk_size if limit is None else min(chunk_size, limit - total)
            count, last = _next_range(session, plans, phase, after, n, now)
            if count:
                yield Range(phase, after, last, count)
                total += count
            if count < n:
                break
            after = last


def new_sweep_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class SweepPlan:
    sweep_id: str
    as_of: datetime
    chunks: int
    planned: int


def dry_run_totals(
    session: Session,
    *,
    tier: str | None = None,
    limit: int | None = None,
    now: datetime | None = None,
    chunk_size: int | None = None,
) -> SweepOut:
    """What the same sweep would return now, changing nothing: every due user counts as renewed."""
    now = _instant(session, now)
    plans = plans_at(now, tier)
    chunk = chunk_size or rules().sweep_chunk_size
    due_users = sum(r.planned for r in _ranges(session, plans, now, limit, chunk))
    return SweepOut(total_processed=due_users, successful=due_users, failed=0, skipped=0, errors=[])


_sweeps = sweep_table.c
_chunks = sweep_chunk_table.c


def plan_sweep(
    session: Session,
    sweep_id: str,
    *,
    tier: str | None = None,
    limit: int | None = None,
    continue_on_error: bool = True,
    now: datetime | None = None,
    chunk_size: int | None = None,
) -> SweepPlan:
    """Fix sweep ``sweep_id`` in the caller's transaction: its instant, its tiers' cutoffs and
    its chunks. Planned before (a redelivered sweep message): the stored plan, unchanged.

    Also deletes the plans and tallies of sweeps older than ``SWEEP_RETENTION``.
    """
    db_now = clock.db_now(session)
    session.execute(delete(sweep_table).where(_sweeps.created_at < db_now - SWEEP_RETENTION))
    now = (now or db_now).astimezone(UTC)
    plans = plans_at(now, tier)
    # The claim: a concurrent duplicate blocks here until this plan commits, then reads it.
    claimed = session.execute(
        insert_ignoring_conflicts(sweep_table).returning(_sweeps.sweep_id),
        {
            "sweep_id": sweep_id,
            "as_of": now,
            "tiers": [p.to_json() for p in plans.values()],
            "continue_on_error": continue_on_error,
            "chunks": 0,
            "stopped": False,
            "created_at": db_now,
        },
    ).first()
    if claimed is None:
        stored = session.execute(
            select(_sweeps.as_of, _sweeps.chunks).where(_sweeps.sweep_id == sweep_id)
        ).one()
        total = session.execute(
            select(func.coalesce(func.sum(_chunks.planned), 0)).where(_chunks.sweep_id == sweep_id)
        ).scalar_one()
        return SweepPlan(sweep_id, stored.as_of, stored.chunks, int(total))
    chunk = chunk_size or rules().sweep_chunk_size
    rows: list[dict[str, Any]] = []
    count = planned = 0

    def flush() -> None:
        if rows:
            session.execute(insert(sweep_chunk_table), rows)
            rows.clear()

    for r in _ranges(session, plans, now, limit, chunk):
        rows.append(
            {
                "sweep_id": sweep_id,
                "chunk_index": count,
                "phase": r.phase.value,
                "after_user": r.after.user_id,
                "after_time": r.after.renewed_at,
                "upto_user": r.upto.user_id,
                "upto_time": r.upto.renewed_at,
                "planned": r.planned,
                "status": "planned",
                "successful": 0,
                "skipped": 0,
                "failed": 0,
                "errors": [],
                "contested": None,
            }
        )
        count += 1
        planned += r.planned
        if len(rows) >= 1000:
            flush()
    flush()
    session.execute(update(sweep_table).where(_sweeps.sweep_id == sweep_id).values(chunks=count))
    log.info(
        "renewal sweep %s planned: %d due users in %d chunks (as of %s)",
        sweep_id,
        planned,
        count,
        now.isoformat(),
    )
    return SweepPlan(sweep_id, now, count, planned)


# --- running a chunk --------------------------------------------------------------------------


@dataclass
class _Tally:
    successful: int = 0
    failed: int = 0
    skipped: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    stopped: bool = False
    by_tier: Counter[str] = field(default_factory=Counter)  # the successful ones, per tier

    def fail(self, user_id: str, exc: BaseException) -> None:
        self.failed += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append({"user_id": user_id, "error": _describe(exc)})


def _describe(exc: BaseException) -> str:
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return (lines[0] if lines else type(cause).__name__)[:MAX_ERROR_LENGTH]


def _isolatable(exc: DBAPIError) -> bool:
    """An error some user's data may have caused (a constraint, a trigger's RAISE, which
    psycopg reports as a ProgrammingError), not the connection or a deadlock: those propagate,
    so the task is retried as a whole."""
    return not (exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError))


@dataclass(frozen=True)
class _Chunk:
    """A chunk row as read under its lock, with what its sweep fixed."""

    sweep_id: str
    index: int
    range: Range
    status: str
    successful: int
    skipped: int
    failed: int
    contested: list[str]
    as_of: datetime
    plans: dict[str, TierPlan]
    continue_on_error: bool
    stopped: bool

    def out(self) -> SweepChunkOut:
        return SweepChunkOut(
            sweep_id=self.sweep_id,
            index=self.index,
            status=self.status,
            successful=self.successful,
            skipped=self.skipped,
            failed=self.failed,
        )


def _lock_chunk(session: Session, sweep_id: str, index: int) -> _Chunk | None:
    """The chunk row, locked: a duplicate of this chunk waits here, then replays its tally."""
    row = session.execute(
        select(
            sweep_chunk_table,
            _sweeps.as_of,
            _sweeps.tiers,
            _sweeps.continue_on_error,
            _sweeps.stopped,
        )
        .join(sweep_table, _sweeps.sweep_id == _chunks.sweep_id)
        .where(_chunks.sweep_id == sweep_id, _chunks.chunk_index == index)
        .with_for_update(of=sweep_chunk_table)
    ).first()
    if row is None:
        return None
    plans = {p["name"]: TierPlan.from_json(p) for p in row.tiers}
    return _Chunk(
        sweep_id=sweep_id,
        index=index,
        range=Range(
            Phase(row.phase),
            Key(row.after_user, row.after_time),
            Key(row.upto_user, row.upto_time),
            row.planned,
        ),
        status=row.status,
        successful=row.successful,
        skipped=row.skipped,
        failed=row.failed,
        contested=list(row.contested or []),
        as_of=row.as_of,
        plans=plans,
        continue_on_error=row.continue_on_error,
        stopped=row.stopped,
    )


def _write_tally(
    session: Session, chunk: _Chunk, status: str, tally: _Tally, contested: list[str]
) -> SweepChunkOut:
    """Store the chunk's tally (added to what it held) in the transaction that renewed it."""
    values: dict[str, Any] = {
        "status": status,
        "successful": chunk.successful + tally.successful,
        "skipped": chunk.skipped + tally.skipped,
        "failed": chunk.failed + tally.failed,
        "contested": contested or None,
    }
    if tally.errors:
        errors = session.execute(
            select(_chunks.errors).where(
                _chunks.sweep_id == chunk.sweep_id, _chunks.chunk_index == chunk.index
            )
        ).scalar_one()
        values["errors"] = (list(errors or []) + tally.errors)[:MAX_ERRORS_LISTED]
    session.execute(
        update(sweep_chunk_table)
        .where(_chunks.sweep_id == chunk.sweep_id, _chunks.chunk_index == chunk.index)
        .values(**values)
    )
    if tally.stopped:
        session.execute(
            update(sweep_table).where(_sweeps.sweep_id == chunk.sweep_id).values(stopped=True)
        )
    note_renewals(
        session,
        renewed=dict(tally.by_tier),
        tokens={t: n * chunk.plans[t].allocation for t, n in tally.by_tier.items()},
        skipped=tally.skipped,
        failed=tally.failed,
        tier=next(iter(chunk.plans)) if len(chunk.plans) == 1 else None,
    )
    return SweepChunkOut(
        sweep_id=chunk.sweep_id,
        index=chunk.index,
        status=status,
        successful=values["successful"],
        skipped=values["skipped"],
        failed=values["failed"],
    )


def run_chunk(sessions: Callable[[], Session], sweep_id: str, index: int) -> SweepChunkOut:
    """Renew chunk ``index`` of a planned sweep, once: run again, it returns its stored tally.

    One transaction renews the chunk's range and writes its tally. Rows others hold are
    skipped and listed in the tally; they are waited for after that commit (waiting while
    holding the chunk's locks could deadlock with the holder), in a second transaction that
    completes the tally. A chunk that fails on some user's data (a constraint, a trigger) is
    redone user by user to isolate the failure; connection trouble and deadlocks propagate,
    and the task is retried. If the sweep has stopped (``continue_on_error=False`` and an
    error), a chunk that has not started does nothing.
    """
    out: SweepChunkOut | None = None
    contested: list[str] = []
    try:
        with sessions() as session, session.begin():
            chunk = _lock_chunk(session, sweep_id, index)
            if chunk is None:
                return _missing(sweep_id, index)
            if chunk.status == "planned":
                out, contested = _renew_chunk(session, chunk)
            else:
                out, contested = chunk.out(), chunk.contested
    except DBAPIError as exc:
        if not _isolatable(exc):
            raise
        log.warning(
            "renewal sweep %s chunk %d failed (%s); renewing it user by user",
            sweep_id,
            index,
            _describe(exc),
        )
        with sessions() as session, session.begin():
            chunk = _lock_chunk(session, sweep_id, index)
            if chunk is None:
                return _missing(sweep_id, index)
            if chunk.status == "planned":
                out = _renew_chunk_one_by_one(session, chunk)
            else:
                out, contested = chunk.out(), chunk.contested
    if out.status == "contested":
        out = _finish_contested(sessions, sweep_id, index, contested)
    log.info(
        "renewal sweep %s chunk %d: %s, %d renewed, %d skipped, %d failed",
        sweep_id,
        index,
        out.status,
        out.successful,
        out.skipped,
        out.failed,
    )
    return out


def _missing(sweep_id: str, index: int) -> SweepChunkOut:
    log.warning(
        "renewal sweep %s chunk %d: no such chunk (expired?); nothing done", sweep_id, index
    )
    return SweepChunkOut(
        sweep_id=sweep_id, index=index, status="missing", successful=0, skipped=0, failed=0
    )


def _renew_chunk(session: Session, chunk: _Chunk) -> tuple[SweepChunkOut, list[str]]:
    if chunk.stopped:
        return _write_tally(session, chunk, "stopped", _Tally(), []), []
    r, plans, now = chunk.range, chunk.plans, chunk.as_of
    params = _params(plans, now, r.after, r.planned, r.upto) | {
        "with_changes": balance_changed.has_listeners()
    }
    _note_expiries(session, session.execute(text(_expire_page_sql(r.phase, plans)), params))
    row = session.execute(text(_chunk_sql(r.phase, plans)), params).one()
    _note_changes(session, row.changes)
    by_tier, contested = Counter(row.by_tier or {}), list(row.contested or [])
    renewed = by_tier.total()
    # Due at planning but not renewed now (renewed meanwhile, or no longer due): skipped.
    tally = _Tally(
        successful=renewed, skipped=r.planned - renewed - len(contested), by_tier=by_tier
    )
    status = "contested" if contested else "done"
    return _write_tally(session, chunk, status, tally, contested), contested


def _renew_chunk_one_by_one(session: Session, chunk: _Chunk) -> SweepChunkOut:
    if chunk.stopped:
        return _write_tally(session, chunk, "stopped", _Tally(), [])
    r = chunk.range
    page = _page(session, chunk.plans, r.phase, r.after, r.planned, chunk.as_of, r.upto)
    tally = _Tally()
    _one_by_one(session, [u for u, _ in page], chunk, tally)
    if not tally.stopped:
        tally.skipped += r.planned - len(page)
    return _write_tally(session, chunk, "done", tally, [])


def _finish_contested(
    sessions: Callable[[], Session], sweep_id: str, index: int, contested: list[str]
) -> SweepChunkOut:
    """Wait for the rows others held, then renew those still due; completes the tally."""
    try:
        with sessions() as session, session.begin():
            chunk = _lock_chunk(session, sweep_id, index)
            if chunk is None:
                return _missing(sweep_id, index)
            if chunk.status != "contested":
                return chunk.out()
            by_tier = _renew_contested(session, chunk.plans, chunk.contested, chunk.as_of)
            renewed = by_tier.total()
            tally = _Tally(
                successful=renewed, skipped=len(chunk.contested) - renewed, by_tier=by_tier
            )
            return _write_tally(session, chunk, "done", tally, [])
    except DBAPIError as exc:
        if not _isolatable(exc):
            raise
    with sessions() as session, session.begin():
        chunk = _lock_chunk(session, sweep_id, index)
        if chunk is None:
            return _missing(sweep_id, index)
        if chunk.status != "contested":
            return chunk.out()
        tally = _Tally()
        _one_by_one(session, chunk.contested, chunk, tally)
        return _write_tally(session, chunk, "done", tally, [])


def _renew_contested(
    session: Session, plans: dict[str, TierPlan], contested: list[str], now: datetime
) -> Counter[str]:
    """Users renewed, per tier."""
    params = _params(plans, now) | {
        "contested": contested,
        "with_changes": balance_changed.has_listeners(),
    }
    _note_expiries(session, session.execute(text(_EXPIRE_CONTESTED_SQL), params))
    row = session.execute(text(_CONTESTED_SQL), params).one()
    _note_changes(session, row.changes)
    return Counter(row.by_tier or {})


def _note_expiries(session: Session, rows: Any) -> None:
    for user_id, reserved, tokens, balances in rows:
        statements.note_expiries(session, user_id, int(reserved), tokens, balances)


def _note_changes(session: Session, changes: list[list[Any]] | None) -> None:
    for user_id, balance, reserved in changes or []:
        note_balance_change(
            session, user_id=user_id, balance=balance, tokens_reserved=reserved, operation=KIND
        )


def _one_by_one(session: Session, user_ids: list[str], chunk: _Chunk, tally: _Tally) -> None:
    """The slow path for a chunk that failed: each user in a savepoint, failures recorded.
    With ``continue_on_error=False`` the first failure stops the chunk (and, through the
    tally, the sweep)."""
    for user_id in user_ids:
        try:
            with session.begin_nested():
                out = _renew_one(session, user_id, chunk.plans, chunk.as_of, source="sweep")
        except DBAPIError as exc:
            if not _isolatable(exc):
                raise
            log.error(
                "renewal sweep %s: user %r failed: %s", chunk.sweep_id, user_id, _describe(exc)
            )
            tally.fail(user_id, exc)
            if not chunk.continue_on_error:
                tally.stopped = True
                return
            continue
        if out is None:
            tally.skipped += 1
        else:
            tally.successful += 1
            tally.by_tier[out.tier] += 1


# --- totals, and the whole sweep in-process ---------------------------------------------------


def sweep_totals(session: Session, sweep_id: str) -> SweepOut:
    """The sweep's result, summed from its chunks' stored tallies (so a chunk that ran twice
    counts once); errors in chunk order, at most ``MAX_ERRORS_LISTED``."""
    successful, skipped, failed = session.execute(
        select(
            *(
                func.coalesce(func.sum(c), 0)
                for c in (_chunks.successful, _chunks.skipped, _chunks.failed)
            )
        ).where(_chunks.sweep_id == sweep_id)
    ).one()
    errors: list[SweepError] = []
    if failed:
        listed = session.execute(
            select(_chunks.errors)
            .where(_chunks.sweep_id == sweep_id, _chunks.failed > 0)
            .order_by(_chunks.chunk_index)
        ).scalars()
        for chunk_errors in listed:
            errors.extend(SweepError(**e) for e in chunk_errors or [])
            if len(errors) >= MAX_ERRORS_LISTED:
                break
    successful, skipped, failed = int(successful or 0), int(skipped or 0), int(failed or 0)
    return SweepOut(
        total_processed=successful + skipped + failed,
        successful=successful,
        failed=failed,
        skipped=skipped,
        errors=errors[:MAX_ERRORS_LISTED],
    )


@dataclass(frozen=True)
class LastSweep:
    """The latest sweep planned, and its chunks' tallies so far."""

    planned_at: datetime
    chunks: int
    pending: int  # chunks not yet run (0: the sweep is complete)
    successful: int
    skipped: int
    failed: int


def last_sweep(session: Session) -> LastSweep | None:
    """The latest sweep (planned by ``renewals.sweep`` or the CLI; dry runs are not recorded),
    or None if none is kept. Two index look-ups: the newest sweep, then its chunks."""
    latest = (
        select(_sweeps.sweep_id, _sweeps.created_at, _sweeps.chunks)
        .order_by(_sweeps.created_at.desc())
        .limit(1)
        .subquery()
    )
    pending = case((_chunks.status.in_(("planned", "contested")), 1), else_=0)
    row = session.execute(
        select(
            latest.c.created_at,
            latest.c.chunks,
            *(
                func.coalesce(func.sum(c), 0)
                for c in (pending, _chunks.successful, _chunks.skipped, _chunks.failed)
            ),
        )
        .select_from(latest.outerjoin(sweep_chunk_table, _chunks.sweep_id == latest.c.sweep_id))
        .group_by(latest.c.sweep_id, latest.c.created_at, latest.c.chunks)
    ).first()
    if row is None:
        return None
    planned_at, chunks, waiting, successful, skipped, failed = row
    return LastSweep(
        planned_at=planned_at,
        chunks=int(chunks),
        pending=int(waiting),
        successful=int(successful),
        skipped=int(skipped),
        failed=int(failed),
    )


def sweep(
    sessions: Callable[[], Session],
    *,
    tier: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    continue_on_error: bool = True,
    now: datetime | None = None,
    chunk_size: int | None = None,
    sweep_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SweepOut:
    """Renew every due user (of ``tier``), at most ``limit``, due longest first, in this
    process: plan, run each chunk in order, sum. ``sessions()`` must give a fresh session each
    time (one transaction per chunk, bounded memory). The task ``renewals.sweep`` runs the same
    steps with its chunks spread over the workers. ``progress(users, planned)`` is called once
    the sweep is planned (0 users) and after each chunk commits (the users it covered)."""
    if dry_run:
        with sessions() as session:
            return dry_run_totals(session, tier=tier, limit=limit, now=now, chunk_size=chunk_size)
    sweep_id = sweep_id or new_sweep_id()
    with sessions() as session, session.begin():
        plan = plan_sweep(
            session,
            sweep_id,
            tier=tier,
            limit=limit,
            continue_on_error=continue_on_error,
            now=now,
            chunk_size=chunk_size,
        )
    if progress is not None:
        progress(0, plan.planned)
    for index in range(plan.chunks):
        chunk = run_chunk(sessions, sweep_id, index)
        if progress is not None:
            progress(chunk.successful + chunk.skipped + chunk.failed, plan.planned)
    with sessions() as session:
        return sweep_totals(session, sweep_id)
