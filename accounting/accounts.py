"""Accounts: open, change tier, read balances.

A member (contract v1.2 pools: an account opened with a parent) has no balance of its own: its
reads show its pool's balance fields with its own ``tokens_spent``, and what changes a balance
or a plan (``set_tier``, like credits, resets and renewals) is refused on it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from accounting import clock, grants, limits
from accounting.catalog import cost_of, tier_of
from accounting.errors import (
    member_account,
    negative_balance,
    parent_not_found,
    user_not_found,
    validation_error,
)
from accounting.events import note_balance_change
from models.schemas import BalanceOut, CanAffordOut, OpenAccountOut
from models.tables import Account


def balance_of(account: Account, session: Session | None = None) -> BalanceOut:
    """The balance fields; with ``session``, the v1.1 grant fields too (``by_kind``,
    ``next_expiry``), and a member's are its pool's but for its own ``tokens_spent``."""
    extra: dict[str, Any] = {}
    pool = account
    if session is not None:
        if account.pool_id is not None:
            pool = load_account(session, account.pool_id)
        extra = {
            "by_kind": grants.by_kind(session, pool.user_id),
            "next_expiry": grants.next_expiry(session, pool.user_id),
        }
    return BalanceOut(
        **extra,
        debt=pool.debt,
        user_id=account.user_id,
        tokens_balance=pool.tokens_balance,
        tokens_reserved=pool.tokens_reserved,
        tokens_available=pool.tokens_balance - pool.tokens_reserved,
        tokens_spent=account.tokens_spent,
        tier=pool.tier,
        last_renewal_at=pool.last_renewal_at,
        subscription_expires_at=pool.subscription_expires_at,
        pool_id=account.pool_id,
        parent_id=account.parent_id,
    )


def pool_of(session: Session, user_id: str) -> str:
    """The account that holds ``user_id``'s balance: its pool, or itself (``USER_NOT_FOUND``).
    A member's pool is fixed when it is opened."""
    row = session.execute(
        select(Account.user_id, Account.pool_id).where(Account.user_id == user_id)
    ).one_or_none()
    if row is None:
        raise user_not_found()
    pool: str = row.pool_id or row.user_id
    return pool


def load_account(session: Session, user_id: str, *, lock: bool = False) -> Account:
    stmt = (
        select(Account).where(Account.user_id == user_id).execution_options(populate_existing=True)
    )
    if lock:
        stmt = stmt.with_for_update()
    account = session.scalars(stmt).one_or_none()
    if account is None:
        raise user_not_found()
    return account


# sql/accounts/tokens_open.sql: the account and its initial balance, through the functions
# every movement uses to grant and write.
_OPEN = text(
    "SELECT * FROM tokens_open(:user_id, :tier, :initial, CAST(:expires AS timestamptz),"
    " CAST(:renewed AS timestamptz), :parent)"
)


def open_account(
    session: Session,
    user_id: str,
    tier: str = "Gift",
    initial_balance: int = 0,
    subscription_expires_at: datetime | None = None,
    last_renewal_at: datetime | None = None,
    parent_id: str | None = None,
) -> OpenAccountOut:
    """Create an account; an existing one is returned unchanged with ``created: false``. With
    ``parent_id`` it is a member of the parent's pool (at most pool, team, member)."""
    tier_of(tier)
    if initial_balance < 0:
        raise negative_balance()
    if parent_id is not None and initial_balance != 0:
        raise validation_error(
            "Invalid arguments: initial_balance: must be 0 for a member (tokens enter through"
            " the pool)"
        )
    row = session.execute(
        _OPEN,
        {
            "user_id": user_id,
            "tier": tier,
            "initial": initial_balance,
            "expires": subscription_expires_at,
            "renewed": last_renewal_at,
            "parent": parent_id,
        },
    ).one()
    if row.status == "parent_not_found":
        raise parent_not_found()
    if row.status == "too_deep":
        raise validation_error(
            "Invalid arguments: parent_id: at most 3 levels (pool, team, member); the parent is"
            " a member of a team"
        )
    if row.entry_id is not None:
        note_balance_change(
            session,
            user_id=user_id,
            balance=initial_balance,
            tokens_reserved=0,
            operation="open_account",
        )
    if not row.created:
        grants.settle_reads(session, pool_of(session, user_id))
    account = load_account(session, user_id)
    return OpenAccountOut(**balance_of(account, session).model_dump(), created=row.created)


def set_tier(
    session: Session, user_id: str, tier: str, subscription_expires_at: datetime | None = None
) -> BalanceOut:
    """Move a user to ``tier``; ``subscription_expires_at`` (None: never) replaces the old one."""
    tier_of(tier)
    if (pool := pool_of(session, user_id)) != user_id:
        raise member_account(pool)
    row = session.execute(
        update(Account)
        .where(Account.user_id == user_id)
        .values(
            tier=tier,
            subscription_expires_at=subscription_expires_at,
            updated_at=clock.stamp(Account.updated_at),
        )
        .returning(Account.user_id)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        raise user_not_found()
    grants.settle_reads(session, user_id)
    return balance_of(load_account(session, user_id), session)


def get_balance(session: Session, user_id: str, as_of: datetime | None = None) -> BalanceOut:
    """The balance now (due grants settled first), or with ``as_of`` the four balance fields
    as they were then (``tokens_balance_at``: the ledger's and the history's, nothing settled)."""
    if as_of is not None:
        return _balance_at(session, user_id, as_of)
    grants.settle_reads(session, pool_of(session, user_id))
    return balance_of(load_account(session, user_id), session)


_BALANCE_AT = text("SELECT * FROM tokens_balance_at(:user_id, :at)")


def _balance_at(session: Session, user_id: str, at: datetime) -> BalanceOut:
    then = session.execute(_BALANCE_AT, {"user_id": user_id, "at": at}).one()
    if not then.found:
        raise user_not_found()
    if then.pruned_before is not None:
        raise validation_error(f"History before {then.pruned_before.isoformat()} was pruned")
    now = balance_of(load_account(session, user_id), session)
    return now.model_copy(
        update={
            "tokens_balance": then.balance,
            "tokens_reserved": then.reserved,
            "tokens_available": then.balance - then.reserved,
            "tokens_spent": then.spent,
            "as_of": at,
        }
    )


def can_afford(session: Session, user_id: str, operation_type: str) -> CanAffordOut:
    """Whether a charge of ``operation_type`` would go through now: enough available tokens
    (the pool's, for a member), and no spend limit it would break (then ``limit`` names it)."""
    cost = cost_of(operation_type)
    pool = pool_of(session, user_id)
    grants.settle_reads(session, pool)
    account = load_account(session, pool)
    available = account.tokens_balance - account.tokens_reserved
    refusing = limits.refusing(session, user_id, cost) if account.limited else None
    return CanAffordOut(
        can_afford=available >= cost and refusing is None,
        cost=cost,
        balance=available,
        deficit=max(0, cost - available),
        limit=refusing,
    )
