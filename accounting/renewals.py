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

``check_eligibility``, ``renew_user`` and ``due`` work in the caller's session and never commit.
``sweep`` is the exception: it processes any number of users in bounded memory, so it takes a
session factory and commits one transaction per chunk.
"""

from __future__ import annotations

import enum
import logging
import time as timer
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    false,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from accounting import clock, idempotency
from accounting.accounts import load_account
from accounting.catalog import known_operation, tier_of
from accounting.errors import not_due, subscription_expired
from models.schemas import DueOut, EligibilityOut, RenewOut, SweepError, SweepOut
from models.tables import Account, LedgerEntry
from worker.settings import FREE_TIERS, get_settings
from worker.signals import balance_changed, note_balance_change

log = logging.getLogger(__name__)

KIND = "renewal"
OPERATION = "monthly_reset"
MAX_ERRORS_LISTED = 100
MAX_ERROR_LENGTH = 500


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
    """What a sweep at ``now`` does to users of one tier."""

    name: str
    allocation: int
    cutoff: datetime
    paid: bool


def plans_at(now: datetime, tier: str | None = None) -> dict[str, TierPlan]:
    """The plan of every configured tier (or of ``tier`` only; unknown: VALIDATION_ERROR)."""
    tiers = get_settings().tiers
    names = list(tiers) if tier is None else [tier]
    plans = {}
    for name in names:
        config = tier_of(name)
        plans[name] = TierPlan(
            name=name,
            allocation=config.tokens,
            cutoff=renewal_cutoff(now, config.period_days),
            paid=name not in FREE_TIERS,
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
        return out
    account = load_account(session, user_id)  # raises USER_NOT_FOUND
    if _expired(account.tier, account.subscription_expires_at, now):
        raise subscription_expired()
    raise not_due(_verdict(account, now).days_until_renewal)


def _allocation(plans: dict[str, TierPlan]) -> ColumnElement[int]:
    return case({p.name: p.allocation for p in plans.values()}, value=Account.tier, else_=0)


def _renew_one(
    session: Session, user_id: str, plans: dict[str, TierPlan], now: datetime, source: str
) -> RenewOut | None:
    """The conditional UPDATE for one user; None when the user is not due (or unknown)."""
    row = session.execute(
        update(Account)
        .where(Account.user_id == user_id, due_clause(plans, now))
        .values(
            tokens_balance=Account.tokens_balance + _allocation(plans),
            last_renewal_at=now,
            updated_at=clock.stamp(session, Account.updated_at),
        )
        .returning(
            Account.tier, Account.tokens_balance, Account.tokens_reserved, Account.updated_at
        )
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        return None
    tier, new_balance, reserved, stamped = row
    added = plans[tier].allocation
    session.execute(
        insert(LedgerEntry).values(
            user_id=user_id,
            kind=KIND,
            operation_type=known_operation(OPERATION),
            tokens_amount=added,
            balance_before=new_balance - added,
            balance_after=new_balance,
            meta={"tier": tier, "source": source},
            created_at=stamped,
        )
    )
    note_balance_change(
        session, user_id=user_id, balance=new_balance, tokens_reserved=reserved, operation=KIND
    )
    return RenewOut(
        user_id=user_id,
        tier=tier,
        tokens_added=added,
        previous_balance=new_balance - added,
        new_balance=new_balance,
        renewal_date=now,
    )


# --- pages of due users -----------------------------------------------------------------------


class Phase(enum.Enum):
    """Due users are visited never-renewed first (by user_id), then by oldest renewal."""

    NEVER = "never renewed"
    LAPSED = "lapsed"


@dataclass(frozen=True)
class Key:
    """Keyset position: the last (last_renewal_at, user_id) visited in a phase."""

    user_id: str = ""  # sorts before every user_id (they are never empty)
    renewed_at: datetime = datetime(1, 1, 1, tzinfo=UTC)


Page = Sequence[tuple[str, datetime | None]]


def _is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


# PostgreSQL. Tiers travel as arrays, so the statement text depends only on which tiers are
# swept. The guard: every renewing statement carries it, so a user renewed meanwhile (committed
# by another transaction, seen here after waiting for its row lock) is left alone.
_TIERS = """tiers AS (
    SELECT * FROM unnest(
        CAST(:tier_names AS text[]), CAST(:allocations AS bigint[]),
        CAST(:cutoffs AS timestamptz[]), CAST(:paid AS boolean[])
    ) AS t(tier, allocation, cutoff, paid)
)"""
_NOT_EXPIRED = (
    "(NOT t.paid OR a.subscription_expires_at IS NULL OR a.subscription_expires_at > :now)"
)
_GUARD = f"(a.last_renewal_at IS NULL OR a.last_renewal_at < t.cutoff) AND {_NOT_EXPIRED}"
_ORDER_DESC = "last_renewal_at DESC, user_id DESC"


def _page_cte(phase: Phase, plans: dict[str, TierPlan]) -> str:
    """The next page of due users (and where their rows are), locking nothing.

    One branch per tier, each an index range scan on ix_accounts_tier_last_renewal (tier,
    last_renewal_at, user_id) already in sweep order, merged (Merge Append): a page reads about
    ``n`` index entries, where an OR across tiers would scan and sort the table for every page.
    In the NEVER phase last_renewal_at is NULL throughout, so the order is user_id order.
    """
    branches = []
    for i, plan in enumerate(plans.values()):
        if phase is Phase.NEVER:
            where = "a.last_renewal_at IS NULL AND a.user_id > :after_user"
        else:
            where = (
                f"a.last_renewal_at < :cutoff_{i} AND (a.last_renewal_at, a.user_id)"
                " > (CAST(:after_time AS timestamptz), :after_user)"
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


# The write time of a renewal: the database's clock under the row lock, never before the
# account's previous change (accounting.clock.stamp), and the entry's created_at is that value.
_RENEW = f"""renewed AS (
    UPDATE accounts a
    SET tokens_balance = a.tokens_balance + t.allocation, last_renewal_at = :now,
        updated_at = GREATEST(clock_timestamp(), a.updated_at)
    FROM locked l, tiers t
    WHERE a.user_id = l.user_id AND a.tier = t.tier AND {_GUARD}
    RETURNING a.user_id, a.tier, a.tokens_balance, a.tokens_reserved, t.allocation, a.updated_at
),
entries AS (
    INSERT INTO ledger_entries
        (user_id, kind, operation_type, tokens_amount, balance_before, balance_after, metadata,
         created_at)
    SELECT user_id, :kind, :operation, allocation, tokens_balance - allocation, tokens_balance,
           jsonb_build_object('tier', tier, 'source', CAST(:source AS text)), updated_at
    FROM renewed
    RETURNING user_id
)"""
_CHANGES = """CASE WHEN :with_changes THEN (
    SELECT json_agg(json_build_array(user_id, tokens_balance, tokens_reserved)) FROM renewed
) END"""


def _chunk_sql(phase: Phase, plans: dict[str, TierPlan]) -> str:
    """Renew one page in one statement. Rows another transaction holds (a debit in flight,
    another sweep) are skipped, not waited for, and come back as ``contested``.

    The lock finds the page's rows by ctid (no index descent); the UPDATE still finds them by
    user_id, so a row changed since the page was read is re-read and re-checked against the
    guard (READ COMMITTED's recheck), never updated from a stale version nor silently missed.
    """
    return f"""WITH {_TIERS}, {_page_cte(phase, plans)},
locked AS (
    SELECT a.user_id FROM accounts a WHERE a.ctid = ANY(ARRAY(SELECT ctid FROM page))
    FOR UPDATE OF a SKIP LOCKED
),
{_RENEW}
SELECT
    (SELECT count(*) FROM page) AS scanned,
    (SELECT count(*) FROM entries) AS renewed,
    (SELECT array_agg(p.user_id) FROM page p
     WHERE p.user_id NOT IN (SELECT user_id FROM locked)) AS contested,
    k.user_id AS last_user,
    k.last_renewal_at AS last_time,
    {_CHANGES} AS changes
FROM (SELECT 1) AS one
LEFT JOIN LATERAL (SELECT * FROM page ORDER BY {_ORDER_DESC} LIMIT 1) k ON true"""


# The contested rows of a page, waited for: locked in user_id order (as every sweep does, so
# two sweeps cannot deadlock), then renewed only if still due once their holder has finished.
_CONTESTED_SQL = f"""WITH {_TIERS},
locked AS (
    SELECT a.user_id FROM accounts a WHERE a.user_id = ANY(CAST(:contested AS text[]))
    ORDER BY a.user_id
    FOR UPDATE OF a
),
{_RENEW}
SELECT (SELECT count(*) FROM entries) AS renewed, {_CHANGES} AS changes"""


def _params(
    plans: dict[str, TierPlan], now: datetime, after: Key | None = None, n: int | None = None
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "tier_names": [p.name for p in plans.values()],
        "allocations": [p.allocation for p in plans.values()],
        "cutoffs": [p.cutoff for p in plans.values()],
        "paid": [p.paid for p in plans.values()],
        "now": now,
        "kind": KIND,
        "operation": OPERATION,
        "source": "sweep",
    }
    if after is not None:
        params |= {"after_user": after.user_id, "after_time": after.renewed_at, "n": n}
        for i, plan in enumerate(plans.values()):
            params |= {f"tier_{i}": plan.name, f"cutoff_{i}": plan.cutoff}
    return params


def _page(
    session: Session,
    plans: dict[str, TierPlan],
    phase: Phase,
    after: Key,
    n: int,
    now: datetime,
) -> Page:
    """The next ``n`` due users of ``phase`` after ``after``, in sweep order; locks nothing."""
    if _is_postgres(session):
        sql = f"WITH {_page_cte(phase, plans)} SELECT user_id, last_renewal_at FROM page"
        rows = session.execute(
            text(sql + " ORDER BY last_renewal_at, user_id"), _params(plans, now, after, n)
        )
        return [(u, t) for u, t in rows]
    stmt = select(Account.user_id, Account.last_renewal_at).where(due_clause(plans, now))
    if phase is Phase.NEVER:
        stmt = stmt.where(
            Account.last_renewal_at.is_(None), Account.user_id > after.user_id
        ).order_by(Account.user_id)
    else:
        stmt = stmt.where(
            Account.last_renewal_at.is_not(None),
            or_(
                Account.last_renewal_at > after.renewed_at,
                and_(
                    Account.last_renewal_at == after.renewed_at,
                    Account.user_id > after.user_id,
                ),
            ),
        ).order_by(Account.last_renewal_at, Account.user_id)
    return [(u, t) for u, t in session.execute(stmt.limit(n))]


def due(
    session: Session, tier: str | None = None, limit: int | None = None, now: datetime | None = None
) -> DueOut:
    """Due users in sweep order: never renewed first, then the oldest renewal."""
    now = _instant(session, now)
    plans = plans_at(now, tier)
    chunk = get_settings().sweep_chunk_size
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


# --- the sweep --------------------------------------------------------------------------------


@dataclass
class _Tally:
    successful: int = 0
    failed: int = 0
    skipped: int = 0
    errors: list[SweepError] = field(default_factory=list)
    stopped: bool = False

    @property
    def processed(self) -> int:
        return self.successful + self.failed + self.skipped

    def fail(self, user_id: str, exc: BaseException) -> None:
        self.failed += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append(SweepError(user_id=user_id, error=_describe(exc)))

    def result(self) -> SweepOut:
        return SweepOut(
            total_processed=self.processed,
            successful=self.successful,
            failed=self.failed,
            skipped=self.skipped,
            errors=self.errors,
        )


def _describe(exc: BaseException) -> str:
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return (lines[0] if lines else type(cause).__name__)[:MAX_ERROR_LENGTH]


def _isolatable(exc: DBAPIError) -> bool:
    """An error some user's data may have caused (a constraint, a trigger's RAISE, which
    psycopg reports as a ProgrammingError), not the connection or a deadlock: those propagate,
    so the task is retried as a whole."""
    return not (exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError))


def sweep(
    sessions: Callable[[], Session],
    *,
    tier: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    continue_on_error: bool = True,
    now: datetime | None = None,
    chunk_size: int | None = None,
) -> SweepOut:
    """Renew every due user (of ``tier``), at most ``limit``, due longest first.

    Commits one transaction per chunk of ``chunk_size`` users: ``sessions()`` must give a fresh
    session each time. On PostgreSQL a chunk is one statement. A chunk that fails on some user's
    data (a constraint, a trigger) is redone user by user to isolate the failure; connection
    trouble and deadlocks propagate (what was committed stays, and a rerun carries on).
    """
    if now is None:
        with sessions() as session:
            now = clock.db_now(session)
    now = now.astimezone(UTC)
    plans = plans_at(now, tier)
    chunk = chunk_size or get_settings().sweep_chunk_size
    tally = _Tally()
    started = timer.perf_counter()
    for phase in Phase if plans else ():
        after, number = Key(), 0
        while not tally.stopped:
            n = chunk if limit is None else min(chunk, limit - tally.successful)
            if n <= 0:
                break
            number += 1
            scanned, after = _sweep_chunk(
                sessions, plans, phase, after, n, now, dry_run, continue_on_error, tally
            )
            elapsed = timer.perf_counter() - started
            log.info(
                "renewal sweep%s: %s, chunk %d: %d due users; so far %d renewed, %d skipped, "
                "%d failed (%.0f users/s)",
                " (dry run)" if dry_run else "",
                phase.value,
                number,
                scanned,
                tally.successful,
                tally.skipped,
                tally.failed,
                tally.processed / elapsed if elapsed > 0 else 0.0,
            )
            if scanned < n:
                break
    return tally.result()


def _sweep_chunk(
    sessions: Callable[[], Session],
    plans: dict[str, TierPlan],
    phase: Phase,
    after: Key,
    n: int,
    now: datetime,
    dry_run: bool,
    continue_on_error: bool,
    tally: _Tally,
) -> tuple[int, Key]:
    """Process the next page of due users; returns its size and the next keyset position."""
    if dry_run:
        with sessions() as session:
            page = _page(session, plans, phase, after, n, now)
        tally.successful += len(page)
        return len(page), _last_key(page, phase, after)
    try:
        with sessions() as session, session.begin():
            if _is_postgres(session):
                scanned, renewed, contested, last = _renew_page_postgres(
                    session, plans, phase, after, n, now
                )
            else:
                scanned, renewed, contested, last = _renew_page_portable(
                    session, plans, phase, after, n, now
                )
    except DBAPIError as exc:
        if not _isolatable(exc):
            raise
        log.warning("renewal sweep: chunk failed (%s); renewing it user by user", _describe(exc))
        with sessions() as session, session.begin():
            page = _page(session, plans, phase, after, n, now)
            _one_by_one(session, [u for u, _ in page], plans, now, continue_on_error, tally)
        return len(page), _last_key(page, phase, after)
    tally.successful += renewed
    tally.skipped += scanned - renewed - len(contested)
    if contested:
        # After the chunk has committed, so this waits for others' locks holding none itself.
        try:
            with sessions() as session, session.begin():
                more = _renew_contested(session, plans, contested, now)
        except DBAPIError as exc:
            if not _isolatable(exc):
                raise
            with sessions() as session, session.begin():
                _one_by_one(session, contested, plans, now, continue_on_error, tally)
        else:
            tally.successful += more
            tally.skipped += len(contested) - more
    return scanned, last


def _last_key(page: Page, phase: Phase, default: Key) -> Key:
    if not page:
        return default
    user_id, renewed_at = page[-1]
    return Key(user_id, renewed_at) if phase is Phase.LAPSED and renewed_at else Key(user_id)


def _renew_page_postgres(
    session: Session,
    plans: dict[str, TierPlan],
    phase: Phase,
    after: Key,
    n: int,
    now: datetime,
) -> tuple[int, int, list[str], Key]:
    params = _params(plans, now, after, n) | {"with_changes": balance_changed.has_listeners()}
    row = session.execute(text(_chunk_sql(phase, plans)), params).one()
    _note_changes(session, row.changes)
    last = after if row.last_user is None else Key(row.last_user, row.last_time or Key.renewed_at)
    return row.scanned, row.renewed, list(row.contested or []), last


def _renew_contested(
    session: Session, plans: dict[str, TierPlan], contested: list[str], now: datetime
) -> int:
    params = _params(plans, now) | {
        "contested": contested,
        "with_changes": balance_changed.has_listeners(),
    }
    row = session.execute(text(_CONTESTED_SQL), params).one()
    _note_changes(session, row.changes)
    renewed: int = row.renewed
    return renewed


def _note_changes(session: Session, changes: list[list[Any]] | None) -> None:
    for user_id, balance, reserved in changes or []:
        note_balance_change(
            session, user_id=user_id, balance=balance, tokens_reserved=reserved, operation=KIND
        )


def _renew_page_portable(
    session: Session,
    plans: dict[str, TierPlan],
    phase: Phase,
    after: Key,
    n: int,
    now: datetime,
) -> tuple[int, int, list[str], Key]:
    """The same chunk as a few set-based statements any dialect runs. SQLite (the embedded
    default) takes one writer at a time, so there is nothing to lock or skip."""
    page = _page(session, plans, phase, after, n, now)
    if not page:
        return 0, 0, [], after
    rows = session.execute(
        update(Account)
        .where(Account.user_id.in_([u for u, _ in page]), due_clause(plans, now))
        .values(
            tokens_balance=Account.tokens_balance + _allocation(plans),
            last_renewal_at=now,
            updated_at=clock.stamp(session, Account.updated_at),
        )
        .returning(
            Account.user_id,
            Account.tier,
            Account.tokens_balance,
            Account.tokens_reserved,
            Account.updated_at,
        )
        .execution_options(synchronize_session=False)
    ).all()
    if rows:
        session.execute(
            insert(LedgerEntry),
            [
                {
                    "user_id": user_id,
                    "kind": KIND,
                    "operation_type": OPERATION,
                    "tokens_amount": plans[tier].allocation,
                    "balance_before": balance - plans[tier].allocation,
                    "balance_after": balance,
                    "meta": {"tier": tier, "source": "sweep"},
                    "created_at": stamped,
                }
                for user_id, tier, balance, _, stamped in rows
            ],
        )
    for user_id, _, balance, reserved, _ in rows:
        note_balance_change(
            session, user_id=user_id, balance=balance, tokens_reserved=reserved, operation=KIND
        )
    return len(page), len(rows), [], _last_key(page, phase, after)


def _one_by_one(
    session: Session,
    user_ids: list[str],
    plans: dict[str, TierPlan],
    now: datetime,
    continue_on_error: bool,
    tally: _Tally,
) -> None:
    """The slow path for a chunk that failed: each user in a savepoint, failures recorded."""
    for user_id in user_ids:
        try:
            with session.begin_nested():
                out = _renew_one(session, user_id, plans, now, source="sweep")
        except DBAPIError as exc:
            if not _isolatable(exc):
                raise
            log.error("renewal sweep: user %r failed: %s", user_id, _describe(exc))
            tally.fail(user_id, exc)
            if not continue_on_error:
                tally.stopped = True
                return
            continue
        if out is None:
            tally.skipped += 1
        else:
            tally.successful += 1
