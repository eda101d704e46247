"""Reservations. Without an ``idempotency_key`` the Celery task id is the key, so a redelivered
message never applies twice."""

from __future__ import annotations

from sqlalchemy.orm import Session

from accounting import reservations
from models.schemas import (
    CaptureIn,
    CaptureOut,
    ExpireOut,
    ExtendIn,
    ExtendOut,
    NoArgsIn,
    ReleaseIn,
    ReleaseOut,
    ReserveIn,
    ReserveOut,
)
from tasks.base import contract_task
from worker.db import session_factory


@contract_task("tokens.reserve", ReserveIn, alone=True)
def reserve(session: Session, p: ReserveIn, task_id: str | None) -> ReserveOut:
    return reservations.reserve(
        session,
        p.user_id,
        amount=p.amount,
        operation_type=p.operation_type,
        ttl_seconds=p.ttl_seconds,
        metadata=p.metadata,
        idempotency_key=p.idempotency_key or task_id,
        overcapture_limit=p.overcapture_limit,
    )


@contract_task("tokens.capture", CaptureIn, alone=True)
def capture(session: Session, p: CaptureIn, task_id: str | None) -> CaptureOut:
    return reservations.capture(
        session, p.reservation_id, amount=p.amount, metadata=p.metadata, idempotency_key=task_id
    )


@contract_task("tokens.release", ReleaseIn, alone=True)
def release(session: Session, p: ReleaseIn, task_id: str | None) -> ReleaseOut:
    return reservations.release(session, p.reservation_id, reason=p.reason, idempotency_key=task_id)


@contract_task("reservations.expire", NoArgsIn)
def expire(_session: Session, _p: NoArgsIn, _task_id: str | None) -> ExpireOut:
    # Commits one transaction per chunk, so it takes sessions of its own (as renewals.sweep).
    return ExpireOut(expired=reservations.expire_all(session_factory()))


@contract_task("tokens.extend", ExtendIn)
def extend(session: Session, p: ExtendIn, task_id: str | None) -> ExtendOut:
    return reservations.extend(
        session,
        p.reservation_id,
        amount=p.amount,
        ttl_seconds=p.ttl_seconds,
        idempotency_key=task_id,
    )
