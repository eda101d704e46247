"""Grants (contract v1.1): every token of a balance belongs to a grant, spent in burn order.

For every user, always: ``balance = sum of ledger = sum(remaining of active grants) - debt``,
and for every grant ``remaining = amount - spent - expired + returned`` (never below 0).

Concurrency: a user's grants and debt change only while the user's account row is locked
(:func:`lock`), so one lock serialises every burn-down, hold, refund and expiry of them; each
statement after the lock reads fresh rows (READ COMMITTED). Lock order everywhere: idempotency
key, then reservation or refund-cap row, then account, then that account's grants.

A movement goes: :func:`lock` -> :func:`expire_due` (a due grant is expired before anything
else reads it) -> build a :class:`Change` (``spend``, ``grant``, ``put_back``...) -> :func:`write`,
which moves the account and writes the ledger entry with its split across grants. Nothing here
commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.orm import Session

from accounting import clock, statements
from accounting.errors import user_not_found
from accounting.events import note_balance_change, note_grants_expired
from models.schemas import GrantOut, GrantsOut, NextExpiry
from models.tables import (
    account_table,
    entry_grant_table,
    grant_table,
    ledger_table,
    reservation_grant_table,
)

ACTIVE, DEPLETED, EXPIRED = "active", "depleted", "expired"
KINDS = ("allowance", "rollover", "purchased", "promo", "adjustment")
DEFAULT_PRIORITY = {"allowance": 10, "rollover": 10, "purchased": 50, "promo": 20, "adjustment": 50}
# The ledger's own operation type (and entry kind) for tokens that leave through expiry.
EXPIRY = "expiry"

_a = account_table.c
_g = grant_table.c

# Burn order: priority, expires_at (never-expiring last), created_at, then creation order.
BURN_ORDER = (_g.priority, _g.expires_at.asc().nulls_last(), _g.created_at, _g.id)


@dataclass
class Locked:
    """A user's account as read under its row lock, and the movement's time."""

    user_id: str
    balance: int
    reserved: int
    spent: int
    debt: int
    now: datetime
    # The user's spendable grants (id, free tokens) in burn order, read with the due ones by
    # :func:`lock_current` so a movement's first burn needs no query of its own; None once
    # anything may have changed them.
    free: list[tuple[int, int]] | None = None

    @property
    def available(self) -> int:
        return self.balance - self.reserved


def _lock_statement(session: Session) -> Select[Any]:
    # The movement's time: the database's clock once the lock is granted, never before the
    # account's previous change (accounting.clock.stamp). PostgreSQL computes a locking query's
    # columns before it waits, and again only if the holder changed the row, so the clock is
    # read in the query around the locking one, which runs once the row is held.
    held = (
        select(_a.tokens_balance, _a.tokens_reserved, _a.tokens_spent, _a.debt, _a.updated_at)
        .where(_a.user_id == bindparam("uid"))
        .with_for_update()
        .subquery()
    )
    return select(
        held.c.tokens_balance,
        held.c.tokens_reserved,
        held.c.tokens_spent,
        held.c.debt,
        clock.stamp(held.c.updated_at),
    )


def lock(session: Session, user_id: str) -> Locked:
    """Lock the user's account row and read it; ``USER_NOT_FOUND`` if there is none."""
    row = session.execute(_lock_statement(session), {"uid": user_id}).first()
    if row is None:
        raise user_not_found()
    balance, reserved, spent, debt, now = row
    return Locked(user_id, int(balance), int(reserved), int(spent), int(debt), now)


def _live(now: datetime | ColumnElement[datetime]) -> ColumnElement[bool]:
    """Active and not yet due at ``now``."""
    return and_(_g.status == ACTIVE, or_(_g.expires_at.is_(None), _g.expires_at > now))


def _due(now: datetime | ColumnElement[datetime]) -> ColumnElement[bool]:
    """Active, past its end, and with tokens no reservation holds."""
    return and_(
        _g.status == ACTIVE,
        _g.expires_at.is_not(None),
        _g.expires_at <= now,
        _g.remaining > _g.held,
    )


def due_unheld(now: datetime | ColumnElement[datetime]) -> ColumnElement[bool]:
    """Grants with tokens to expire at ``now`` (active, past their end, not all held): what
    ``grants.expire`` looks for across users (accounting/expiry.py)."""
    return _due(now)


@dataclass
class Change:
    """One ledger entry's effect, built under the account lock and written by :func:`write`.

    ``splits`` is the signed change to each grant's ``remaining``, in the order applied;
    the entry's amount is ``sum(splits) - debt_delta``.
    """

    locked: Locked
    splits: list[tuple[int, int]] = field(default_factory=list)
    debt_delta: int = 0

    @property
    def delta(self) -> int:
        return sum(amount for _, amount in self.splits) - self.debt_delta

    def _add(self, grant_id: int, amount: int) -> None:
        # One split per grant and entry: an over-capture may spend more of a grant the
        # capture's hold already took from; it keeps the place of the first.
        for i, (gid, before) in enumerate(self.splits):
            if gid == grant_id:
                self.splits[i] = (gid, before + amount)
                return
        self.splits.append((grant_id, amount))

    def spend(self, session: Session, amount: int, *, into_debt: bool) -> int:
        """Spend ``amount`` of the user's free tokens (not held, not due) in burn order; with
        ``into_debt`` what they do not cover becomes debt. Returns what became debt."""
        taken, left = burn(free_grants(session, self.locked), amount) if amount else ([], 0)
        if taken:
            session.execute(
                _SPEND, [{"gid": g, "take": t, "now": self.locked.now} for g, t in taken]
            )
            for grant_id, take in taken:
                self._add(grant_id, -take)
        if left and not into_debt:
            raise AssertionError("spend beyond the free tokens without into_debt")
        self.debt_delta += left
        return left

    def spend_held(self, session: Session, grant_id: int, take: int, release: int) -> None:
        """Spend ``take`` of what a reservation holds of a grant and free ``release`` more of
        its hold: a capture spends its held tokens even if their grant ended meanwhile."""
        session.execute(
            _SPEND_HELD,
            {"gid": grant_id, "take": take, "unhold": take + release, "now": self.locked.now},
        )
        self.locked.free = None
        if take:
            self._add(grant_id, -take)

    def grant(
        self,
        session: Session,
        kind: str,
        amount: int,
        *,
        priority: int | None = None,
        expires_at: datetime | None = None,
    ) -> int:
        """Make a grant of ``amount``; it pays the user's debt first. Returns its id."""
        debt = self.locked.debt + self.debt_delta
        paid = min(debt, amount)
        left = amount - paid
        grant_id = session.execute(
            insert(grant_table).returning(_g.id),
            {
                "user_id": self.locked.user_id,
                "kind": kind,
                "amount": amount,
                "remaining": left,
                "held": 0,
                "spent": paid,
                "expired": 0,
                "returned": 0,
                "priority": DEFAULT_PRIORITY[kind] if priority is None else priority,
                "expires_at": expires_at,
                "status": ACTIVE if left else DEPLETED,
                "created_at": self.locked.now,
                "ended_at": None if left else self.locked.now,
            },
        ).scalar_one()
        self._add(int(grant_id), left)
        self.debt_delta -= paid
        self.locked.free = None
        return int(grant_id)

    def put_back(self, session: Session, grant_id: int, amount: int) -> bool:
        """Return ``amount`` to a grant an entry spent. Returns whether the grant has ended
        (expired, or past its end): then the caller expires the tokens again at once."""
        ended = session.execute(
            update(grant_table)
            .where(_g.id == grant_id)
            .values(
                remaining=_g.remaining + amount,
                returned=_g.returned + amount,
                status=case((_g.status == DEPLETED, ACTIVE), else_=_g.status),
                ended_at=case((_g.status == DEPLETED, None), else_=_g.ended_at),
            )
            .returning(
                or_(
                    _g.status == EXPIRED,
                    and_(_g.expires_at.is_not(None), _g.expires_at <= self.locked.now),
                )
            )
        ).scalar_one()
        self._add(grant_id, amount)
        self.locked.free = None
        return bool(ended)


_SPEND = (
    update(grant_table)
    .where(_g.id == bindparam("gid"))
    .values(
        remaining=_g.remaining - bindparam("take"),
        spent=_g.spent + bindparam("take"),
        status=case((_g.remaining == bindparam("take"), DEPLETED), else_=_g.status),
        ended_at=case((_g.remaining == bindparam("take"), bindparam("now")), else_=_g.ended_at),
    )
)
_SPEND_HELD = (
    update(grant_table)
    .where(_g.id == bindparam("gid"))
    .values(
        remaining=_g.remaining - bindparam("take"),
        spent=_g.spent + bindparam("take"),
        held=_g.held - bindparam("unhold"),
        status=case((_g.remaining == bindparam("take"), DEPLETED), else_=_g.status),
        ended_at=case((_g.remaining == bindparam("take"), bindparam("now")), else_=_g.ended_at),
    )
)


def write(
    session: Session,
    change: Change,
    *,
    kind: str,
    operation_type: str,
    spent_delta: int = 0,
    reserved_delta: int = 0,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    original_entry_id: int | None = None,
    event: str | None = None,
) -> tuple[int, Locked]:
    """Apply ``change`` to the account and write its ledger entry and split; returns the entry
    id and the account after it. The account must be locked (:func:`lock`)."""
    locked = change.locked
    delta = change.delta
    row = session.execute(
        _MOVE,
        {
            "uid": locked.user_id,
            "delta": delta,
            "debt_delta": change.debt_delta,
            "reserved_delta": reserved_delta,
            "spent_delta": spent_delta,
            "now": locked.now,
        },
    ).one()
    balance, reserved, spent, debt = (int(v) for v in row)
    entry_id = int(
        session.execute(
            _INSERT_ENTRY,
            {
                "user_id": locked.user_id,
                "kind": kind,
                "operation_type": operation_type,
                "tokens_amount": delta,
                "balance_before": balance - delta,
                "balance_after": balance,
                "idempotency_key": idempotency_key,
                "original_entry_id": original_entry_id,
                "metadata": metadata or {},
                "created_at": locked.now,
            },
        ).scalar_one()
    )
    if change.splits:
        session.execute(
            insert(entry_grant_table),
            [
                {"entry_id": entry_id, "grant_id": gid, "amount": amount, "seq": seq}
                for seq, (gid, amount) in enumerate(change.splits)
            ],
        )
    after = Locked(locked.user_id, balance, reserved, spent, debt, locked.now)
    note_balance_change(
        session,
        user_id=locked.user_id,
        balance=balance,
        tokens_reserved=reserved,
        operation=event or kind,
    )
    return entry_id, after


_spent_after = _a.tokens_spent + bindparam("spent_delta")
_MOVE = (
    update(account_table)
    .where(_a.user_id == bindparam("uid"))
    .values(
        tokens_balance=_a.tokens_balance + bindparam("delta"),
        debt=_a.debt + bindparam("debt_delta"),
        tokens_reserved=_a.tokens_reserved + bindparam("reserved_delta"),
        tokens_spent=case((_spent_after < 0, 0), else_=_spent_after),
        updated_at=bindparam("now", type_=account_table.c.updated_at.type),
    )
    .returning(_a.tokens_balance, _a.tokens_reserved, _a.tokens_spent, _a.debt)
)
_INSERT_ENTRY = insert(ledger_table).returning(ledger_table.c.id)


def burn(free: Iterable[Sequence[int]], amount: int) -> tuple[list[tuple[int, int]], int]:
    """Take ``amount`` from (grant id, free tokens) rows given in burn order: what is taken of
    each grant, in that order, and what no grant covered. The one allocation every burn-down
    uses (a movement's spend, a hold, a batch's items)."""
    left, taken = amount, []
    for grant_id, tokens in free:
        if left == 0:
            break
        if tokens > 0:
            take = min(tokens, left)
            taken.append((grant_id, take))
            left -= take
    return taken, left


def free_grants(session: Session, locked: Locked) -> list[tuple[int, int]]:
    """The user's spendable grants and their free tokens (remaining - held), in burn order:
    those :func:`lock_current` read, else read now. Used once: a burn changes them."""
    if locked.free is not None:
        rows, locked.free = locked.free, None
        return rows
    found = session.execute(
        select(_g.id, _g.remaining - _g.held)
        .where(_g.user_id == locked.user_id, _live(locked.now), _g.remaining > _g.held)
        .order_by(*BURN_ORDER)
    ).all()
    return [(int(g), int(f)) for g, f in found]


def expire_due(session: Session, locked: Locked) -> Locked:
    """Expire what is left (less what reservations hold) of the user's grants due at
    ``locked.now``: one ``expiry`` entry per grant, before the movement that found them.
    The account must be locked. Returns the account after, with its spendable grants read by
    the same query (:func:`free_grants`)."""
    due = and_(_g.expires_at.is_not(None), _g.expires_at <= locked.now)
    rows = session.execute(
        select(_g.id, _g.remaining - _g.held, due, _g.expires_at)
        .where(_g.user_id == locked.user_id, _g.status == ACTIVE, _g.remaining > _g.held)
        .order_by(*BURN_ORDER)
    ).all()
    ending = sorted(((e, g, f) for g, f, d, e in rows if d), key=lambda r: (r[0], r[1]))
    free = [(int(g), int(f)) for g, f, d, _ in rows if not d]
    for _, grant_id, left in ending:
        locked = expire_grant(session, locked, int(grant_id), int(left))
    locked.free = free
    return locked


def expire_grant(session: Session, locked: Locked, grant_id: int, tokens: int) -> Locked:
    """Write off ``tokens`` of an ended grant through its own ``expiry`` entry."""
    session.execute(
        update(grant_table)
        .where(_g.id == grant_id)
        .values(
            remaining=_g.remaining - tokens,
            expired=_g.expired + tokens,
            status=case((_g.remaining == tokens, EXPIRED), else_=_g.status),
            ended_at=func.coalesce(_g.ended_at, _g.expires_at, literal(locked.now)),
        )
    )
    change = Change(locked, [(grant_id, -tokens)])
    _, after = write(
        session,
        change,
        kind=EXPIRY,
        operation_type=EXPIRY,
        metadata={"grant_id": str(grant_id)},
    )
    note_grants_expired(session, grants=1, tokens=tokens)
    return after


_LOCK_CURRENT = text("SELECT * FROM tokens_lock(:user_id)")


def lock_current(session: Session, user_id: str) -> Locked:
    """The account locked and its due grants expired, as a movement may use it. On PostgreSQL
    that is ``tokens_lock`` (sql/accounts/tokens_lock.sql), the one definition of the lock, the
    movement's time and a due grant's expiry that every statement uses."""
    row = session.execute(_LOCK_CURRENT, {"user_id": user_id}).one()
    if row.moment is None:
        raise user_not_found()
    statements.note_expiries(
        session, user_id, int(row.reserved), row.expired_tokens, row.expired_balances
    )
    return Locked(
        user_id, int(row.balance), int(row.reserved), int(row.spent), int(row.debt), row.moment
    )


def any_due(session: Session, user_id: str) -> ColumnElement[bool]:
    """Whether ``user_id`` has a due grant, as an SQL expression (one index probe)."""
    return exists().where(_g.user_id == user_id, _due(clock.now_sql()))


def settle_reads(session: Session, user_id: str) -> None:
    """Before a read of one user: expire their due grants, if any, so every read sees a due
    grant as expired (one index probe when none is due; the lock only when one is)."""
    if session.execute(select(any_due(session, user_id))).scalar_one():
        lock_current(session, user_id)


# --- reads ------------------------------------------------------------------------------------


def grant_out(row: Any) -> GrantOut:
    return GrantOut(
        grant_id=str(row.id),
        kind=row.kind,
        amount=int(row.amount),
        remaining=int(row.remaining),
        held=int(row.held),
        priority=int(row.priority),
        expires_at=row.expires_at,
        created_at=row.created_at,
        status=row.status,
    )


_COLUMNS = (
    _g.id,
    _g.kind,
    _g.amount,
    _g.remaining,
    _g.held,
    _g.priority,
    _g.expires_at,
    _g.created_at,
    _g.status,
    _g.ended_at,
)


def list_grants(session: Session, user_id: str, include_ended: bool = False) -> GrantsOut:
    """``tokens.grants``: active grants in burn order, then (``include_ended``) ended ones
    newest first, and the debt."""
    settle_reads(session, user_id)
    debt = session.execute(select(_a.debt).where(_a.user_id == user_id)).scalar_one_or_none()
    if debt is None:
        raise user_not_found()
    active = session.execute(
        select(*_COLUMNS).where(_g.user_id == user_id, _g.status == ACTIVE).order_by(*BURN_ORDER)
    ).all()
    grants = [grant_out(r) for r in active]
    if include_ended:
        ended = session.execute(
            select(*_COLUMNS)
            .where(_g.user_id == user_id, _g.status != ACTIVE)
            .order_by(_g.ended_at.desc().nulls_last(), _g.created_at.desc(), _g.id.desc())
        ).all()
        grants += [grant_out(r) for r in ended]
    return GrantsOut(user_id=user_id, grants=grants, debt=int(debt))


def by_kind(session: Session, user_id: str) -> dict[str, int]:
    rows = session.execute(
        select(_g.kind, func.sum(_g.remaining))
        .where(_g.user_id == user_id, _g.status == ACTIVE)
        .group_by(_g.kind)
        .order_by(_g.kind)
    ).all()
    return {kind: int(total) for kind, total in rows if total}


def next_expiry(session: Session, user_id: str) -> NextExpiry | None:
    """The soonest moment an active grant ends, and the tokens of every grant ending then (an
    allowance and its rollover often end together: a user is told both)."""
    ending = (
        select(_g.expires_at, _g.remaining)
        .where(_g.user_id == user_id, _g.status == ACTIVE, _g.remaining > 0)
        .where(_g.expires_at > clock.now_sql())
        .subquery()
    )
    soonest = select(func.min(ending.c.expires_at)).scalar_subquery()
    row = session.execute(
        select(ending.c.expires_at, func.sum(ending.c.remaining))
        .where(ending.c.expires_at == soonest)
        .group_by(ending.c.expires_at)
    ).first()
    return None if row is None else NextExpiry(at=row[0], tokens=int(row[1]))


# Users in debt and what they owe, through the partial index of accounts in debt: the cost follows
# the debtors, not the number of accounts (the metrics read it on each scrape). A literal, so the
# planner can match the index's condition.
DEBT = select(func.count(), func.coalesce(func.sum(_a.debt), 0)).where(
    _a.debt > literal(0, literal_execute=True)
)


def total_debt(session: Session) -> tuple[int, int]:
    """How many users are in debt and the tokens they owe, across all users."""
    users, tokens = session.execute(DEBT).one()
    return int(users), int(tokens)


# --- holds (reservations) ----------------------------------------------------------------------

_rg = reservation_grant_table.c


def hold(session: Session, locked: Locked, reservation_id: str, amount: int) -> None:
    """Hold ``amount`` of the user's free tokens for a reservation, chosen in burn order, and
    count it in ``tokens_reserved``. The caller has checked ``locked.available``, which leaves
    the free tokens enough (available = free - debt)."""
    burnt, left = burn(free_grants(session, locked), amount)
    if left:
        raise AssertionError(f"hold of {amount} beyond the free tokens")
    taken = [{"gid": g, "take": t, "rid": reservation_id} for g, t in burnt]
    session.execute(_HOLD, taken)
    # A reservation extended (tokens.extend) may hold more of a grant it already holds.
    existing = {
        int(g)
        for g in session.scalars(select(_rg.grant_id).where(_rg.reservation_id == reservation_id))
    }
    new = [t for t in taken if t["gid"] not in existing]
    more = [t for t in taken if t["gid"] in existing]
    if new:
        session.execute(
            insert(reservation_grant_table),
            [
                {"reservation_id": reservation_id, "grant_id": t["gid"], "amount": t["take"]}
                for t in new
            ],
        )
    if more:
        session.execute(
            update(reservation_grant_table)
            .where(_rg.reservation_id == bindparam("rid"), _rg.grant_id == bindparam("gid"))
            .values(amount=_rg.amount + bindparam("take")),
            more,
        )


_HOLD = (
    update(grant_table).where(_g.id == bindparam("gid")).values(held=_g.held + bindparam("take"))
)


def holds_of(session: Session, reservation_id: str) -> list[tuple[int, int]]:
    """What a reservation holds of each grant, in burn order."""
    rows = session.execute(
        select(_rg.grant_id, _rg.amount)
        .join(grant_table, _g.id == _rg.grant_id)
        .where(_rg.reservation_id == reservation_id)
        .order_by(*BURN_ORDER)
    ).all()
    return [(int(g), int(a)) for g, a in rows]


def unhold(session: Session, reservation_ids: list[str]) -> None:
    """Free what the given (ended) reservations held of their grants. Their accounts must be
    locked; tokens freed in a grant that has ended are then due (:func:`expire_due`)."""
    rows = session.execute(
        select(_rg.grant_id, func.sum(_rg.amount))
        .where(_rg.reservation_id.in_(reservation_ids))
        .group_by(_rg.grant_id)
        .order_by(_rg.grant_id)
    ).all()
    if rows:
        session.execute(_UNHOLD, [{"gid": g, "n": int(n)} for g, n in rows])


_UNHOLD = update(grant_table).where(_g.id == bindparam("gid")).values(held=_g.held - bindparam("n"))


def move_reserved(session: Session, locked: Locked, reserved_delta: int, event: str) -> Locked:
    """Change what the account holds (a hold made, extended or ended), with no ledger entry."""
    balance, reserved = session.execute(
        update(account_table)
        .where(_a.user_id == locked.user_id)
        .values(
            tokens_reserved=_a.tokens_reserved + reserved_delta,
            updated_at=literal(locked.now, type_=account_table.c.updated_at.type),
        )
        .returning(_a.tokens_balance, _a.tokens_reserved)
    ).one()
    note_balance_change(
        session, user_id=locked.user_id, balance=balance, tokens_reserved=reserved, operation=event
    )
    return Locked(
        locked.user_id, int(balance), int(reserved), locked.spent, locked.debt, locked.now
    )
