"""Housekeeping on the beat schedule."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.orm import Session

from accounting import expiry, idempotency, months
from models.schemas import DeletedOut, GrantsExpireOut, MonthsOut, NoArgsIn
from tasks.base import contract_task
from worker.db import session_factory
from worker.settings import get_settings


@contract_task("idempotency.prune", NoArgsIn)
def prune_idempotency(_session: Session, _p: NoArgsIn, _task_id: str | None) -> DeletedOut:
    # Commits one transaction per chunk, so it takes sessions of its own (as reservations.expire).
    retention = timedelta(days=get_settings().idempotency_retention_days)
    return DeletedOut(deleted=idempotency.prune_all(session_factory(), retention))


@contract_task("grants.expire", NoArgsIn)
def expire_grants(_session: Session, _p: NoArgsIn, _task_id: str | None) -> GrantsExpireOut:
    # One transaction per chunk of due grants (accounting/expiry.py), on sessions of its own.
    expired, tokens = expiry.expire_all(session_factory())
    return GrantsExpireOut(expired=expired, tokens_expired=tokens)


@contract_task("ledger.make_months", NoArgsIn)
def make_months(session: Session, _p: NoArgsIn, _task_id: str | None) -> MonthsOut:
    # The ledger's partitions, three months ahead (accounting/months.py); usually none to make.
    return months.keep_ahead(session)
