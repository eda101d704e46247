"""Grants (contract v1.1): every token of a balance belongs to a grant, spent in burn order.

For every user, always: ``balance = sum of ledger = sum(remaining of active grants) - debt``,
and for every grant ``remaining = amount - spent - expired + returned`` (never below 0).

Concurrency: a user's grants and debt change only while the user's account row is locked
(``tokens_lock``), so one lock serialises every burn-down, hold, refund and expiry of them; each
statement after the lock reads fresh rows (READ COMMITTED). Lock order everywhere: idempotency
key, then reservation or refund-cap row, then account, then that account's grants.

Every movement is a function under sql/ (tokens_lock, then tokens_burn or tokens_grant, then
tokens_write, each the one definition of its step); what is left here are the reads of grants,
:func:`lock_current` for the reads that settle a due grant. Nothing here commits.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    func,
    literal,
    select,
    text,
)
from sqlalchemy.orm import Session

from accounting import clock, statements
from accounting.errors import user_not_found
from models.schemas import GrantOut, GrantsOut, NextExpiry
from models.tables import (
    account_table,
    grant_table,
    reservation_grant_table,
)

ACTIVE, DEPLETED, EXPIRED = "active", "depleted", "expired"
KINDS = ("allowance", "rollover", "purchased", "promo", "adjustment")
DEFAULT_PRIORITY = {"allowance": 10, "rollover": 10, "purchased": 50, "promo": 20, "adjustment": 50}
# The ledger's own operation type (and entry kind) for tokens that leave through expiry.
EXPIRY = "expiry"

_a = account_table.c
_g = grant_table.c

# The burn order (sql/grants/tokens_burn_order.sql), the order grants are listed in.
BURN_ORDER = func.tokens_burn_order(_g.priority, _g.expires_at, _g.created_at, _g.id)


_LOCK_CURRENT = text("SELECT * FROM tokens_lock(:user_id)")


def lock_current(session: Session, user_id: str) -> None:
    """Lock the account and expire its due grants: ``tokens_lock`` (sql/accounts/tokens_lock.sql),
    the one definition of the lock, the movement's time and a due grant's expiry that every
    statement uses. ``USER_NOT_FOUND`` if there is no such account."""
    row = session.execute(_LOCK_CURRENT, {"user_id": user_id}).one()
    if row.moment is None:
        raise user_not_found()
    statements.note_expiries(
        session, user_id, int(row.reserved), row.expired_tokens, row.expired_balances
    )


# Whether the user has a grant due to expire (sql/grants/tokens_grant_due.sql), at the moment
# the row is read: one probe of the user's grants.
_ANY_DUE = text(
    "SELECT EXISTS (SELECT FROM grants g"
    " WHERE g.user_id = :user_id AND tokens_grant_due(g, clock_timestamp()))"
)


def settle_reads(session: Session, user_id: str) -> None:
    """Before a read of one user: expire their due grants, if any, so every read sees a due
    grant as expired (one index probe when none is due; the lock only when one is)."""
    if session.execute(_ANY_DUE, {"user_id": user_id}).scalar_one():
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
        select(*_COLUMNS).where(_g.user_id == user_id, _g.status == ACTIVE).order_by(BURN_ORDER)
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
