"""Balance movements: validate, then one statement of the functions under sql/movements/, which
lock the account, spend or make grants and write the ledger entry with its split.

Nothing here commits; the caller (a task, the CLI, a test) owns the transaction, or runs the
statement alone (:mod:`accounting.statements`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from accounting import credit as credit_statement
from accounting import idempotency, spend
from accounting import refund as refund_statement
from accounting.catalog import known_operation, price_of
from accounting.errors import (
    entry_not_found,
    invalid_amount,
    negative_balance,
    validation_error,
)
from models.schemas import DebitIn, MovementOut

# Entries a refund may point at: what took tokens for a service.
REFUNDABLE_KINDS = ("debit", "charge", "capture")
# What tokens.credit may make (renewals make allowances, refunds and resets adjustments).
CREDIT_KINDS = ("purchased", "promo")


def _spend_once(
    session: Session,
    *,
    user_id: str,
    kind: str,
    operation_type: str,
    amount: int,
    allow_overdraft: bool,
    metadata: dict[str, Any],
    idempotency_key: str | None,
    digest: str,
) -> MovementOut:
    """A debit or charge under its idempotency key: one statement (``accounting.spend``)."""
    return spend.spend(
        session,
        user_id=user_id,
        kind=kind,
        operation_type=operation_type,
        amount=amount,
        allow_overdraft=allow_overdraft,
        metadata=metadata,
        idempotency_key=idempotency_key,
        digest=digest,
    )


def debit(
    session: Session,
    user_id: str,
    amount: int,
    operation_type: str,
    allow_overdraft: bool = False,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> MovementOut:
    if amount <= 0:
        raise invalid_amount("Debit")
    known_operation(operation_type)
    metadata = metadata or {}
    digest = debit_digest(amount, operation_type, allow_overdraft, metadata)
    return _spend_once(
        session,
        user_id=user_id,
        kind="debit",
        operation_type=operation_type,
        amount=amount,
        allow_overdraft=allow_overdraft,
        metadata=metadata,
        idempotency_key=idempotency_key,
        digest=digest,
    )


def debit_digest(
    amount: int, operation_type: str, allow_overdraft: bool, metadata: dict[str, Any]
) -> str:
    """What a debit asks for, as its idempotency key records it."""
    return idempotency.request_hash(
        "debit",
        amount=amount,
        operation_type=operation_type,
        allow_overdraft=allow_overdraft,
        metadata=metadata,
    )


def debit_payload(session: Session, p: DebitIn, idempotency_key: str | None) -> MovementOut:
    """:func:`debit` for a validated ``tokens.debit`` payload (the task and batch items)."""
    return debit(
        session,
        p.user_id,
        p.amount,
        p.operation_type,
        allow_overdraft=p.allow_overdraft,
        metadata=p.metadata,
        idempotency_key=idempotency_key,
    )


def credit(
    session: Session,
    user_id: str,
    amount: int,
    operation_type: str = "purchase",
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    grant_kind: str = "purchased",
    expires_at: datetime | None = None,
    priority: int | None = None,
) -> MovementOut:
    """Add ``amount`` as a new ``purchased`` (or ``promo``) grant; it pays any debt first. On
    One statement (``accounting.credit``)."""
    if amount <= 0:
        raise invalid_amount("Credit")
    known_operation(operation_type)
    if grant_kind not in CREDIT_KINDS:
        raise validation_error(
            f"Invalid arguments: grant_kind: must be one of {', '.join(CREDIT_KINDS)}"
        )
    metadata = metadata or {}
    # v1.1 arguments enter the key's digest only when given, so a v1 request's digest (and a
    # key stored before the upgrade) stays what it was.
    grant_args: dict[str, Any] = {}
    if grant_kind != "purchased":
        grant_args["grant_kind"] = grant_kind
    if expires_at is not None:
        grant_args["expires_at"] = expires_at.isoformat()
    if priority is not None:
        grant_args["priority"] = priority
    digest = idempotency.request_hash(
        "credit", amount=amount, operation_type=operation_type, metadata=metadata, **grant_args
    )
    return credit_statement.credit(
        session,
        user_id=user_id,
        amount=amount,
        operation_type=operation_type,
        grant_kind=grant_kind,
        priority=priority,
        expires_at=expires_at,
        metadata=metadata,
        idempotency_key=idempotency_key,
        digest=digest,
    )


def charge(
    session: Session,
    user_id: str,
    operation_type: str,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> MovementOut:
    cost = price_of(operation_type)
    metadata = metadata or {}
    digest = idempotency.request_hash("charge", operation_type=operation_type, metadata=metadata)
    return _spend_once(
        session,
        user_id=user_id,
        kind="charge",
        operation_type=operation_type,
        amount=cost,
        allow_overdraft=False,
        metadata=metadata,
        idempotency_key=idempotency_key,
        digest=digest,
    )


def refund(
    session: Session,
    user_id: str,
    amount: int,
    reason: str | None = None,
    original_entry_id: str | int | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> MovementOut:
    """Give tokens back; against ``original_entry_id``, never more in all than it charged. On
    One statement (``accounting.refund``)."""
    if amount <= 0:
        raise invalid_amount("Refund")
    metadata = dict(metadata or {})
    if reason is not None:
        metadata.setdefault("reason", reason)
    original = None if original_entry_id is None else _entry_id(original_entry_id)
    digest = idempotency.request_hash(
        "refund", amount=amount, original_entry_id=original, metadata=metadata
    )
    return refund_statement.refund(
        session,
        user_id=user_id,
        amount=amount,
        original_entry_id=original,
        metadata=metadata,
        idempotency_key=idempotency_key,
        digest=digest,
    )


def _entry_id(value: str | int) -> int:
    if isinstance(value, int):
        # Past the BIGINT range PostgreSQL raises instead of finding nothing.
        if not 0 < value < 2**63:
            raise entry_not_found()
        return value
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise entry_not_found()
    return int(value)


def reset_balance(
    session: Session,
    user_id: str,
    new_balance: int,
    reason: str | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> MovementOut:
    """Set the balance to ``new_balance`` with an ``adjustment`` entry of the difference. On
    One statement (``accounting.credit``)."""
    if new_balance < 0:
        raise negative_balance()
    metadata = dict(metadata or {})
    if reason is not None:
        metadata.setdefault("reason", reason)
    digest = idempotency.request_hash("reset_balance", new_balance=new_balance, metadata=metadata)
    operation_type = known_operation("adjustment")
    return credit_statement.reset(
        session,
        user_id=user_id,
        new_balance=new_balance,
        operation_type=operation_type,
        metadata=metadata,
        idempotency_key=idempotency_key,
        digest=digest,
    )
