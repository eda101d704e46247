"""Renewals. They run on their own queue (worker/config.py routes ``renewals.*``), so a long
sweep never delays debits."""

from __future__ import annotations

from sqlalchemy.orm import Session

from accounting import renewals
from models.schemas import DueIn, DueOut, EligibilityOut, RenewOut, SweepIn, SweepOut, UserIn
from tasks.base import contract_task
from worker.db import session_factory
from worker.settings import get_settings


@contract_task("renewals.check_eligibility", UserIn)
def check_eligibility(session: Session, p: UserIn, _task_id: str | None) -> EligibilityOut:
    return renewals.check_eligibility(session, p.user_id)


@contract_task("renewals.renew_user", UserIn)
def renew_user(session: Session, p: UserIn, _task_id: str | None) -> RenewOut:
    # Idempotent without a key: a redelivered message finds the user no longer due (NOT_DUE).
    return renewals.renew_user(session, p.user_id)


_SWEEP_LIMIT = get_settings().sweep_time_limit
_SWEEP_LIMITS = (
    {}
    if _SWEEP_LIMIT is None
    else {"soft_time_limit": _SWEEP_LIMIT - 30, "time_limit": _SWEEP_LIMIT}
)


@contract_task("renewals.sweep", SweepIn, **_SWEEP_LIMITS)
def sweep(_session: Session, p: SweepIn, _task_id: str | None) -> SweepOut:
    # The sweep commits one transaction per chunk, so it takes sessions of its own; the task's
    # session stays unused (and so never opens a connection).
    return renewals.sweep(
        session_factory(),
        tier=p.tier,
        limit=p.limit,
        dry_run=p.dry_run,
        continue_on_error=p.continue_on_error,
    )


@contract_task("renewals.due", DueIn)
def due(session: Session, p: DueIn, _task_id: str | None) -> DueOut:
    return renewals.due(session, tier=p.tier, limit=p.limit)
