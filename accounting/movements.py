"""Balance movements: each locks the account, spends or makes grants, and writes its ledger
entry with the split across grants, in one transaction (``accounting.grants``).

Nothing here commits; the caller (a task, the CLI, a test) owns the transaction.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session

from accounting import credit as credit_statement
from accounting import grants, idempotency, spend, statements
from accounting import refund as refund_statement
from accounting.catalog import known_operation, price_of
from accounting.errors import (
    below_reserved,
    entry_not_found,
    expires_at_not_future,
    insufficient_tokens,
    invalid_amount,
    negative_balance,
    refund_exceeds_original,
    validation_error,
)
from models.schemas import DebitIn, MovementOut
from models.tables import LedgerEntry, entry_grant_table, refund_total_table

# Entries a refund may point at: what took tokens for a service.
REFUNDABLE_KINDS = ("debit", "charge", "capture")
# What tokens.credit may make (renewals make allowances, refunds and resets adjustments).
CREDIT_KINDS = ("purchased", "promo")


def movement_result(
    locked: grants.Locked, operation_type: str, delta: int, entry_id: int
) -> MovementOut:
    """The contract's movement result for an entry of ``delta`` leaving the account ``locked``."""
    return MovementOut(
        user_id=locked.user_id,
        operation_type=operation_type,
        amount=delta,
        balance_before=locked.balance - delta,
        new_balance=locked.balance,
        tokens_spent=locked.spent,
        ledger_entry_id=str(entry_id),
    )


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
    """A debit or charge under its idempotency key: on PostgreSQL the one statement
    (``accounting.spend``), elsewhere the portable path (replay, else :func:`_spend`)."""
    if statements.applies(session):
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
    statements.need_transaction(session)
    if (
        replay := idempotency.replay(session, user_id, idempotency_key, digest, MovementOut)
    ) is not None:
        return replay
    out = _spend(
        session,
        user_id=user_id,
        kind=kind,
        operation_type=operation_type,
        amount=amount,
        allow_overdraft=allow_overdraft,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    return _done(session, idempotency_key, out)


def _spend(
    session: Session,
    *,
    user_id: str,
    kind: str,
    operation_type: str,
    amount: int,
    allow_overdraft: bool,
    metadata: dict[str, Any],
    idempotency_key: str | None,
) -> MovementOut:
    """A debit or charge: spend ``amount`` in burn order, refused beyond what is available
    unless ``allow_overdraft`` (then what no grant covers becomes debt)."""
    locked = grants.lock_current(session, user_id)
    if not allow_overdraft and locked.available < amount:
        raise insufficient_tokens(amount, locked.available)
    change = grants.Change(locked)
    change.spend(session, amount, into_debt=True)
    entry_id, after = grants.write(
        session,
        change,
        kind=kind,
        operation_type=operation_type,
        spent_delta=amount,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    return movement_result(after, operation_type, -amount, entry_id)


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
    PostgreSQL one statement (``accounting.credit``)."""
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
    if statements.applies(session):
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
    statements.need_transaction(session)
    if (
        replay := idempotency.replay(session, user_id, idempotency_key, digest, MovementOut)
    ) is not None:
        return replay
    locked = grants.lock_current(session, user_id)
    if expires_at is not None and expires_at <= locked.now:
        raise expires_at_not_future()
    change = grants.Change(locked)
    change.grant(session, grant_kind, amount, priority=priority, expires_at=expires_at)
    entry_id, after = grants.write(
        session,
        change,
        kind="credit",
        operation_type=operation_type,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    return _done(session, idempotency_key, movement_result(after, operation_type, amount, entry_id))


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
    PostgreSQL one statement (``accounting.refund``), elsewhere the portable path below."""
    if amount <= 0:
        raise invalid_amount("Refund")
    metadata = dict(metadata or {})
    if reason is not None:
        metadata.setdefault("reason", reason)
    original = None if original_entry_id is None else _entry_id(original_entry_id)
    digest = idempotency.request_hash(
        "refund", amount=amount, original_entry_id=original, metadata=metadata
    )
    if statements.applies(session):
        return refund_statement.refund(
            session,
            user_id=user_id,
            amount=amount,
            original_entry_id=original,
            metadata=metadata,
            idempotency_key=idempotency_key,
            digest=digest,
        )
    statements.need_transaction(session)
    if (
        replay := idempotency.replay(session, user_id, idempotency_key, digest, MovementOut)
    ) is not None:
        return replay
    already = 0 if original is None else _check_refundable(session, user_id, original, amount)
    locked = grants.lock_current(session, user_id)
    change = grants.Change(locked)
    ended: list[tuple[int, int]] = []
    if original is None:
        change.grant(session, "adjustment", amount)
    else:
        ended = _put_back(session, change, original, already, amount)
    operation_type = known_operation("refund")
    entry_id, after = grants.write(
        session,
        change,
        kind="refund",
        operation_type=operation_type,
        spent_delta=-amount,
        metadata=metadata,
        idempotency_key=idempotency_key,
        original_entry_id=original,
    )
    out = movement_result(after, operation_type, amount, entry_id)
    # A refund never revives an ended grant: what went back into one leaves again at once.
    for grant_id, tokens in ended:
        after = grants.expire_grant(session, after, grant_id, tokens)
    return _done(session, idempotency_key, out)


def _put_back(
    session: Session, change: grants.Change, original: int, already: int, amount: int
) -> list[tuple[int, int]]:
    """Return ``amount`` to where ``original`` took its tokens from, last spent first, after the
    ``already`` refunded tokens. What the entry took as debt (spent after every grant) comes
    back first: it pays the user's debt, and once that is paid it is a new ``adjustment``
    grant. Returns the (grant, tokens) put back into grants that have ended."""
    splits = session.execute(
        select(entry_grant_table.c.grant_id, entry_grant_table.c.amount)
        .where(entry_grant_table.c.entry_id == original, entry_grant_table.c.amount < 0)
        .order_by(entry_grant_table.c.seq.desc())
    ).all()
    charged = -session.execute(
        select(LedgerEntry.tokens_amount).where(LedgerEntry.id == original)
    ).scalar_one()
    from_grants = sum(-int(a) for _, a in splits)
    sources: list[tuple[int | None, int]] = [(None, charged - from_grants)]
    sources += [(int(g), -int(a)) for g, a in splits]
    skip, left = already, amount
    ended: list[tuple[int, int]] = []
    for grant_id, took in sources:
        if skip >= took:
            skip -= took
            continue
        share = min(took - skip, left)
        skip = 0
        left -= share
        if grant_id is None:
            debt = change.locked.debt + change.debt_delta
            paid = min(debt, share)
            change.debt_delta -= paid
            if share > paid:
                change.grant(session, "adjustment", share - paid)
        elif change.put_back(session, grant_id, share):
            ended.append((grant_id, share))
        if left == 0:
            break
    if left:
        # An entry written before grants existed has no split: its tokens come back as one
        # adjustment grant, as a refund without an original would.
        change.grant(session, "adjustment", left)
    return ended


def _entry_id(value: str | int) -> int:
    if isinstance(value, int):
        # Past the BIGINT range PostgreSQL raises instead of finding nothing.
        if not 0 < value < 2**63:
            raise entry_not_found()
        return value
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        raise entry_not_found()
    return int(value)


def _check_refundable(session: Session, user_id: str, entry_id: int, amount: int) -> int:
    """Count ``amount`` against what ``entry_id`` charged, or refuse; returns what had been
    refunded against it before.

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
            postgresql.insert(refund_total_table)
            .values(entry_id=entry_id, user_id=user_id, charged=charged, refunded=amount)
            .on_conflict_do_update(
                index_elements=[totals.entry_id],
                set_={"refunded": totals.refunded + amount},
                where=totals.refunded + amount <= totals.charged,
            )
            .returning(totals.refunded)
        ).first()
        if added is not None:
            return int(added[0]) - amount
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
    """Set the balance to ``new_balance`` with an ``adjustment`` entry of the difference. On
    PostgreSQL one statement (``accounting.credit``)."""
    if new_balance < 0:
        raise negative_balance()
    metadata = dict(metadata or {})
    if reason is not None:
        metadata.setdefault("reason", reason)
    digest = idempotency.request_hash("reset_balance", new_balance=new_balance, metadata=metadata)
    operation_type = known_operation("adjustment")
    if statements.applies(session):
        return credit_statement.reset(
            session,
            user_id=user_id,
            new_balance=new_balance,
            operation_type=operation_type,
            metadata=metadata,
            idempotency_key=idempotency_key,
            digest=digest,
        )
    statements.need_transaction(session)
    if (
        replay := idempotency.replay(session, user_id, idempotency_key, digest, MovementOut)
    ) is not None:
        return replay
    locked = grants.lock_current(session, user_id)
    # What reservations hold was promised; a balance under it would let a capture overdraw.
    if new_balance < locked.reserved:
        raise below_reserved(locked.reserved)
    change = grants.Change(locked)
    delta = new_balance - locked.balance
    if delta > 0:
        change.grant(session, "adjustment", delta)
    elif delta < 0:
        # Never into debt: new_balance >= reserved leaves the free tokens enough.
        change.spend(session, -delta, into_debt=False)
    entry_id, after = grants.write(
        session,
        change,
        kind="adjustment",
        operation_type=operation_type,
        metadata=metadata,
        idempotency_key=idempotency_key,
    )
    return _done(session, idempotency_key, movement_result(after, operation_type, delta, entry_id))
