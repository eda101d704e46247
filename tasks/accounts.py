"""Accounts and balances."""

from __future__ import annotations

from sqlalchemy.orm import Session

from accounting import accounts, grants, limits
from models.schemas import (
    BalanceIn,
    BalanceOut,
    CanAffordIn,
    CanAffordOut,
    GrantsIn,
    GrantsOut,
    LimitsOut,
    OpenAccountIn,
    OpenAccountOut,
    SetLimitIn,
    SetTierIn,
    UserIn,
)
from tasks.base import contract_task


@contract_task("tokens.open_account", OpenAccountIn)
def open_account(session: Session, p: OpenAccountIn, _task_id: str | None) -> OpenAccountOut:
    return accounts.open_account(
        session,
        p.user_id,
        tier=p.tier,
        initial_balance=p.initial_balance,
        subscription_expires_at=p.subscription_expires_at,
        last_renewal_at=p.last_renewal_at,
        parent_id=p.parent_id,
    )


@contract_task("tokens.set_tier", SetTierIn)
def set_tier(session: Session, p: SetTierIn, _task_id: str | None) -> BalanceOut:
    return accounts.set_tier(session, p.user_id, p.tier, p.subscription_expires_at)


@contract_task("tokens.get_balance", BalanceIn)
def get_balance(session: Session, p: BalanceIn, _task_id: str | None) -> BalanceOut:
    return accounts.get_balance(session, p.user_id, p.as_of)


@contract_task("tokens.can_afford", CanAffordIn)
def can_afford(session: Session, p: CanAffordIn, _task_id: str | None) -> CanAffordOut:
    return accounts.can_afford(session, p.user_id, p.operation_type)


@contract_task("tokens.grants", GrantsIn)
def list_grants(session: Session, p: GrantsIn, _task_id: str | None) -> GrantsOut:
    return grants.list_grants(session, p.user_id, include_ended=p.include_ended)


@contract_task("tokens.set_limit", SetLimitIn)
def set_limit(session: Session, p: SetLimitIn, _task_id: str | None) -> LimitsOut:
    return limits.set_limit(session, p.user_id, p.name, p.max_tokens, p.period, p.rolling)


@contract_task("tokens.limits", UserIn)
def list_limits(session: Session, p: UserIn, _task_id: str | None) -> LimitsOut:
    return limits.limits(session, p.user_id)
