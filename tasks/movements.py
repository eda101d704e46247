"""Movements. Without an ``idempotency_key`` the Celery task id is the key, so a redelivered
message never applies twice."""

from __future__ import annotations

from sqlalchemy.orm import Session

from accounting import batches, movements
from models.schemas import (
    ChargeIn,
    CreditIn,
    DebitBatchIn,
    DebitBatchOut,
    DebitIn,
    MovementOut,
    RefundIn,
    ResetBalanceIn,
)
from tasks.base import contract_task


@contract_task("tokens.debit", DebitIn, alone=True)
def debit(session: Session, p: DebitIn, task_id: str | None) -> MovementOut:
    return movements.debit_payload(session, p, p.idempotency_key or task_id)


# Not in the contract: an extension for producers that move many debits at once.
@contract_task("tokens.debit_batch", DebitBatchIn)
def debit_batch(session: Session, p: DebitBatchIn, task_id: str | None) -> DebitBatchOut:
    return batches.debit_batch(session, p.debits, task_id)


@contract_task("tokens.credit", CreditIn, alone=True)
def credit(session: Session, p: CreditIn, task_id: str | None) -> MovementOut:
    return movements.credit(
        session,
        p.user_id,
        p.amount,
        p.operation_type,
        metadata=p.metadata,
        idempotency_key=p.idempotency_key or task_id,
        grant_kind=p.grant_kind,
        expires_at=p.expires_at,
        priority=p.priority,
    )


@contract_task("tokens.charge", ChargeIn, alone=True)
def charge(session: Session, p: ChargeIn, task_id: str | None) -> MovementOut:
    return movements.charge(
        session,
        p.user_id,
        p.operation_type,
        metadata=p.metadata,
        idempotency_key=p.idempotency_key or task_id,
    )


@contract_task("tokens.refund", RefundIn, alone=True)
def refund(session: Session, p: RefundIn, task_id: str | None) -> MovementOut:
    return movements.refund(
        session,
        p.user_id,
        p.amount,
        reason=p.reason,
        original_entry_id=p.original_entry_id,
        metadata=p.metadata,
        idempotency_key=p.idempotency_key or task_id,
    )


@contract_task("tokens.reset_balance", ResetBalanceIn, alone=True)
def reset_balance(session: Session, p: ResetBalanceIn, task_id: str | None) -> MovementOut:
    return movements.reset_balance(
        session,
        p.user_id,
        p.new_balance,
        reason=p.reason,
        metadata=p.metadata,
        idempotency_key=task_id,
    )
