"""Ledger queries and maintenance."""

from __future__ import annotations

from sqlalchemy.orm import Session

from accounting import chain, ledger
from models.schemas import (
    DeletedOut,
    DeleteOldEntriesIn,
    EntriesByTypeIn,
    EntriesOut,
    ReconcileIn,
    ReconcileOut,
    StatisticsOut,
    TotalOut,
    UserEntriesIn,
    UserPeriodIn,
    VerifyIn,
    VerifyOut,
)
from tasks.base import contract_task
from worker.db import session_factory
from worker.settings import get_settings


@contract_task("ledger.user_entries", UserEntriesIn)
def user_entries(session: Session, p: UserEntriesIn, _task_id: str | None) -> EntriesOut:
    return ledger.user_entries(
        session, p.user_id, p.operation_type, p.start_date, p.end_date, p.limit, p.offset
    )


@contract_task("ledger.entries_by_type", EntriesByTypeIn)
def entries_by_type(session: Session, p: EntriesByTypeIn, _task_id: str | None) -> EntriesOut:
    return ledger.entries_by_type(
        session, p.operation_type, p.start_date, p.end_date, p.limit, p.offset
    )


@contract_task("ledger.total_spent", UserPeriodIn)
def total_spent(session: Session, p: UserPeriodIn, _task_id: str | None) -> TotalOut:
    return ledger.total_spent(session, p.user_id, p.start_date, p.end_date)


@contract_task("ledger.total_earned", UserPeriodIn)
def total_earned(session: Session, p: UserPeriodIn, _task_id: str | None) -> TotalOut:
    return ledger.total_earned(session, p.user_id, p.start_date, p.end_date)


@contract_task("ledger.statistics", UserPeriodIn)
def statistics(session: Session, p: UserPeriodIn, _task_id: str | None) -> StatisticsOut:
    return ledger.statistics(session, p.user_id, p.start_date, p.end_date)


@contract_task("ledger.delete_old_entries", DeleteOldEntriesIn)
def delete_old_entries(
    _session: Session, p: DeleteOldEntriesIn, _task_id: str | None
) -> DeletedOut:
    # Commits as it goes (whole months dropped first, then users a chunk at a time), so it takes
    # sessions of its own (as idempotency.prune).
    return ledger.delete_old_entries_in_chunks(session_factory(), p.older_than)


@contract_task("ledger.reconcile", ReconcileIn)
def reconcile(session: Session, p: ReconcileIn, _task_id: str | None) -> ReconcileOut:
    return ledger.reconcile(session, p.user_id)


@contract_task("ledger.verify", VerifyIn)
def verify(session: Session, p: VerifyIn, _task_id: str | None) -> VerifyOut:
    return chain.verify(session, p.user_id, get_settings().verify_on)
