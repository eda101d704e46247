"""A debit or charge in one statement: ``tokens_spend()`` (sql/movements/tokens_spend.sql).

Claim, lock, expire, guard, burn, write and record in one round trip; the replay, the refusals
and the events come back from its row. It runs in the caller's transaction or alone
(:mod:`accounting.statements`).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from accounting import statements
from accounting.errors import insufficient_tokens, limit_exceeded
from accounting.events import note_balance_change
from models.schemas import MovementOut

_CALL = (
    "tokens_spend(:user_id, :key, :digest, :kind, :op, :amount, :overdraft,"
    " CAST(:metadata AS jsonb))"
)


def spend(
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
    """Claim, lock, expire, guard, burn, write and record in one statement; the replay, the
    refusals and the events as the Python path has them."""
    row = statements.call(
        session,
        _CALL,
        {
            "user_id": user_id,
            "key": idempotency_key,
            "digest": digest,
            "kind": kind,
            "op": operation_type,
            "amount": amount,
            "overdraft": allow_overdraft,
            "metadata": json.dumps(metadata),
        },
    )
    return outcome(session, row, user_id=user_id, kind=kind, amount=amount)


def outcome(session: Session, row: Any, *, user_id: str, kind: str, amount: int) -> MovementOut:
    """A ``tokens_spend`` row as its movement: the stored outcome of a replay, or the refusal
    raised, or the movement with its events noted (a single debit's, and each of a batch's). A
    member's events are its pool's, whose balance moved."""
    if (replay := statements.replayed(row, MovementOut)) is not None:
        return replay
    reserved = int(row.reserved)
    statements.note_expiries(session, row.pool, reserved, row.expired_tokens, row.expired_balances)
    if row.status == "insufficient":
        raise insufficient_tokens(amount, int(row.available))
    if row.status == "limit":
        raise limit_exceeded(row.refused, amount)
    note_balance_change(
        session,
        user_id=row.pool,
        balance=int(row.balance),
        tokens_reserved=reserved,
        operation=kind,
    )
    return MovementOut(**row.response)
