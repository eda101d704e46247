"""Balance movements: each is one guarded UPDATE plus its ledger entry, in one transaction.

Nothing here commits; the caller (a task, the CLI, a test) owns the transaction.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from sqlalchemy import Update, bindparam, case, insert, select, update
from sqlalchemy.orm import Session

from accounting import clock, idempotency
from accounting.accounts import load_account
from accounting.catalog import known_operation, price_of
from accounting.errors import (
    below_reserved,
    entry_not_found,
    insufficient_tokens,
    invalid_amount,
    negative_balance,
    refund_exceeds_original,
)
from accounting.events import note_balance_change
from models.schemas import DebitIn, MovementOut
from models.tables import LedgerEntry, account_table, ledger_table, refund_total_table

# Entries a refund may point at: what took tokens for a service.
REFUNDABLE_KINDS = ("debit", "charge", "capture")


_accounts = account_table.c
_reserved_after = _accounts.tokens_reserved - bindparam("release_reserved")
_spent_after = _accounts.tokens_spent + bindparam("spent_delta")
_INSERT_ENTRY = insert(ledger_table).returning(ledger_table.c.id)


@cache
def _move_statements(dialect: str) -> tuple[Update, Update]:
    """(unguarded, guarded) balance UPDATEs for ``dialect``, built once: constructing a statement
    costs more than running it on the hot path.

    ``updated_at`` is the account's clock: stamped by the database under the row lock and never
    earlier than the previous change; the ledger entry takes its ``created_at`` from it.
    """
    move = (
        update(account_table)
        .where(_accounts.user_id == bindparam("uid"))
        .values(
            tokens_balance=_accounts.tokens_balance + bindparam("delta"),
            tokens_reserved=_reserved_after,
            tokens_spent=case((_spent_after < 0, 0), else_=_spent_after),
            updated_at=clock.stamp(dialect, _accounts.updated_at),
        )
        .returning(
            _accounts.tokens_balance,
            _accounts.tokens_reserved,
            _accounts.tokens_spent,
            _accounts.updated_at,
        )
    )
    # The guard is part of the statement: concurrent movements serialise on the account row and
    # each re-checks what is available, so none is lost or overspent.
    guarded = move.where(
        _accounts.tokens_balance - _reserved_after >= bindparam("require_available")
    )
    return move, guarded


def apply_movement(
    session: Session,
    *,
    user_id: str,
    kind: str,
    operation_type: str,
    delta: int,
    spent_delta: int = 0,
    require_available: int | None = None,
    release_reserved: int = 0,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    original_entry_id: int | None = None,
) -> MovementOut:
    """Move ``delta`` tokens and write the ledger entry, atomically.

    With ``require_available`` the UPDATE only matches while ``balance - reserved`` covers it;
    no value is read and written back. ``release_reserved`` frees held tokens in the same
    statement (a reservation capture).
    """
    move, guarded = _move_statements(clock.dialect_of(session))
    params = {
        "uid": user_id,
        "delta": delta,
        "spent_delta": spent_delta,
        "release_reserved": release_reserved,
    }
    if require_available is None:
        row = session.execute(move, params).first()
    else:
        row = session.execute(guarded, {**params, "require_available": require_available}).first()
    if row is None:
        account = load_account(session, user_id)  # raises USER_NOT_FOUND
        available = account.tokens_balance - account.tokens_reserved + release_reserved
        raise insufficient_tokens(require_available or 0, available)
    new_balance, tokens_reserved, tokens_spent, now = row
    before = new_balance - delta
    entry_id = session.execute(
        _INSERT_ENTRY,
        {
            "user_id": user_id,
            "kind": kind,
            "operation_type": operation_type,
            "tokens_amount": delta,
            "balance_before": before,
            "balance_after": new_balance,
            "idempotency_key": idempotency_key,
            "original_entry_id": original_entry_id,
            "metadata": metadata or {},
            "created_at": now,
        },
    ).scalar_one()
    note_balance_change(
        session,
        user_id=user_id,
        balance=new_balance,
        tokens_reserved=tokens_reserved,
        operation=kind,
    )
    return MovementOut(
        user_id=user_id,
        operation_type=operation_type,
        amount=delta,
        balance_before=before,
        new_balance=new_balance,
        tokens_spent=tokens_spent,
        ledger_entry_id=str(entry_id),
    )


def _done(session: Session, key: str | None, out: MovementOut) -> MovementOut:
    idempotency.record(session, out.user_id, key, out.model_dump(mode="json"))
    return out


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
    if (
        replay := idempotency.replay(session, user_id, idempotency_key, digest, MovementOut)
    ) is not None:
        return replay
    out = apply_movement(
        session,
        user_id=user_id,
        kind="debit",
        operation_type=operation_type,
        delta=-amount,
        spent_delta=amount,
        require_available=None if allow_overdraft else amount,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    return _done(session, idempotency_key, out)


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
) -> MovementOut:
    if amount <= 0:
        raise invalid_amount("Credit")
    known_operation(operation_type)
    metadata = metadata or {}
    digest = idempotency.request_hash(
        "credit", amount=amount, operation_type=operation_type, metadata=metadata
    )
    if (
        replay := idempotency.replay(session, user_id, idempotency_key, digest, MovementOut)
    ) is not None:
        return replay
    out = apply_movement(
        session,
        user_id=user_id,
        kind="credit",
        operation_type=operation_type,
        delta=amount,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    return _done(session, idempotency_key, out)


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
    if (
        replay := idempotency.replay(session, user_id, idempotency_key, digest, MovementOut)
    ) is not None:
        return replay
    out = apply_movement(
        session,
        user_id=user_id,
        kind="charge",
        operation_type=operation_type,
        delta=-cost,
        spent_delta=cost,
        require_available=cost,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    return _done(session, idempotency_key, out)


def refund(
    session: Session,
    user_id: str,
    amount: int,
    reason: str | None = None,
    original_entry_id: str | int | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> MovementOut:
    """Give tokens back; against ``original_entry_id``, never more in all than it charged."""
    if amount <= 0:
        raise invalid_amount("Refund")
    metadata = dict(metadata or {})
    if reason is not None:
        metadata.setdefault("reason", reason)
    original = None if original_entry_id is None else _entry_id(original_entry_id)
    digest = idempotency.request_hash(
        "refund", amount=amount, original_entry_id=original, metadata=metadata
    )
    if (
        replay := idempotency.replay(session, user_id, idempotency_key, digest, MovementOut)
    ) is not None:
        return replay
    if original is not None:
        _check_refundable(session, user_id, original, amount)
    out = apply_movement(
        session,
        user_id=user_id,
        kind="refund",
        operation_type=known_operation("refund"),
        delta=amount,
        spent_delta=-amount,
        metadata=metadata,
        idempotency_key=idempotency_key,
        original_entry_id=original,
    )
    return _done(session, idempotency_key, out)


def _entry_id(value: str | int) -> int:
    if isinstance(value, int):
        # Past the BIGINT range PostgreSQL raises instead of finding nothing.
        if not 0 < value < 2**63:
            raise entry_not_found()
        return value
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise entry_not_found()
    return int(value)


def _check_refundable(session: Session, user_id: str, entry_id: int, amount: int) -> None:
    """Count ``amount`` against what ``entry_id`` charged, or refuse.

    The running total lives in ``refund_totals``, not in a sum over refund entries that pruning
    may delete. One upsert both checks and adds, so concurrent refunds of one entry serialise on
    its row and together never exceed the charge.
    """
    original = session.execute(
        select(LedgerEntry.tokens_amount).where(
            LedgerEntry.id == entry_id,
            LedgerEntry.user_id == user_id,
            LedgerEntry.kind.in_(REFUNDABLE_KINDS),
        )
    ).scalar_one_or_none()
    if original is None:
        raise entry_not_found()
    charged = -original
    if amount <= charged:
        totals = refund_total_table.c
        added = session.execute(
            idempotency.dialect_insert(session, refund_total_table)
            .values(entry_id=entry_id, user_id=user_id, charged=charged, refunded=amount)
            .on_conflict_do_update(
                index_elements=[totals.entry_id],
                set_={"refunded": totals.refunded + amount},
                where=totals.refunded + amount <= totals.charged,
            )
            .returning(totals.refunded)
        ).first()
        if added is not None:
            return
    refunded = session.execute(
        select(refund_total_table.c.refunded).where(refund_total_table.c.entry_id == entry_id)
    ).scalar_one_or_none()
    raise refund_exceeds_original(charged, refunded or 0)


def reset_balance(
    session: Session,
    user_id: str,
    new_balance: int,
    reason: str | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> MovementOut:
    """Set the balance to ``new_balance`` with an ``adjustment`` entry of the difference."""
    if new_balance < 0:
        raise negative_balance()
    metadata = dict(metadata or {})
    if reason is not None:
        metadata.setdefault("reason", reason)
    digest = idempotency.request_hash("reset_balance", new_balance=new_balance, metadata=metadata)
    if (
        replay := idempotency.replay(session, user_id, idempotency_key, digest, MovementOut)
    ) is not None:
        return replay
    account = load_account(session, user_id, lock=True)
    # What reservations hold was promised; a balance under it would let a capture overdraw.
    if new_balance < account.tokens_reserved:
        raise below_reserved(account.tokens_reserved)
    out = apply_movement(
        session,
        user_id=user_id,
        kind="adjustment",
        operation_type=known_operation("adjustment"),
        delta=new_balance - account.tokens_balance,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    return _done(session, idempotency_key, out)
