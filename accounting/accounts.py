"""Accounts: open, change tier, read balances."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from accounting import clock, grants
from accounting.catalog import cost_of, tier_of
from accounting.errors import negative_balance, user_not_found
from accounting.events import note_balance_change
from models.schemas import BalanceOut, CanAffordOut, OpenAccountOut
from models.tables import Account


def balance_of(account: Account, session: Session | None = None) -> BalanceOut:
    """The balance fields; with ``session``, the v1.1 grant fields too (``by_kind``,
    ``next_expiry``)."""
    extra: dict[str, Any] = {}
    if session is not None:
        extra = {
            "by_kind": grants.by_kind(session, account.user_id),
            "next_expiry": grants.next_expiry(session, account.user_id),
        }
    return BalanceOut(
        **extra,
        debt=account.debt,
        user_id=account.user_id,
        tokens_balance=account.tokens_balance,
        tokens_reserved=account.tokens_reserved,
        tokens_available=account.tokens_balance - account.tokens_reserved,
        tokens_spent=account.tokens_spent,
        tier=account.tier,
        last_renewal_at=account.last_renewal_at,
        subscription_expires_at=account.subscription_expires_at,
    )


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
    " CAST(:renewed AS timestamptz))"
)


def open_account(
    session: Session,
    user_id: str,
    tier: str = "Gift",
    initial_balance: int = 0,
    subscription_expires_at: datetime | None = None,
    last_renewal_at: datetime | None = None,
) -> OpenAccountOut:
    """Create an account; an existing one is returned unchanged with ``created: false``."""
    tier_of(tier)
    if initial_balance < 0:
        raise negative_balance()
    row = session.execute(
        _OPEN,
        {
            "user_id": user_id,
            "tier": tier,
            "initial": initial_balance,
            "expires": subscription_expires_at,
            "renewed": last_renewal_at,
        },
    ).one()
    if row.entry_id is not None:
        note_balance_change(
            session,
            user_id=user_id,
            balance=initial_balance,
            tokens_reserved=0,
            operation="open_account",
        )
    if not row.created:
        grants.settle_reads(session, user_id)
    account = load_account(session, user_id)
    return OpenAccountOut(**balance_of(account, session).model_dump(), created=row.created)


def set_tier(
    session: Session, user_id: str, tier: str, subscription_expires_at: datetime | None = None
) -> BalanceOut:
    """Move a user to ``tier``; ``subscription_expires_at`` (None: never) replaces the old one."""
    tier_of(tier)
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


def get_balance(session: Session, user_id: str) -> BalanceOut:
    grants.settle_reads(session, user_id)
    return balance_of(load_account(session, user_id), session)


def can_afford(session: Session, user_id: str, operation_type: str) -> CanAffordOut:
    cost = cost_of(operation_type)
    grants.settle_reads(session, user_id)
    account = load_account(session, user_id)
    available = account.tokens_balance - account.tokens_reserved
    return CanAffordOut(
        can_afford=available >= cost,
        cost=cost,
        balance=available,
        deficit=max(0, cost - available),
    )
