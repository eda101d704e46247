"""A refund in one statement: ``tokens_refund()`` (sql/movements/tokens_refund.sql): the key,
the account lock, the refund cap, where the tokens go back (the original's debt part first, then
its grants, last spent first) and the re-expiry of what went back into an ended grant.

The replay, the refusals and the events come back from its row. It runs in the caller's
transaction or alone (:mod:`accounting.statements`).
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy.orm import Session

from accounting import statements
from accounting.errors import entry_not_found, refund_exceeds_original
from accounting.events import note_balance_change
from models.schemas import MovementOut

_CALL = "tokens_refund(:user_id, :key, :digest, :original, :amount, CAST(:metadata AS jsonb))"


def refund(
    session: Session,
    *,
    user_id: str,
    amount: int,
    original_entry_id: int | None,
    metadata: dict[str, Any],
    idempotency_key: str | None,
    digest: str,
) -> MovementOut:
    """Claim, cap, lock, expire, put back, write, expire again and record in one statement; the
    replay, the refusals and the events as the Python path has them."""
    row = statements.call(
        session,
        _CALL,
        {
            "user_id": user_id,
            "key": idempotency_key,
            "digest": digest,
            "original": original_entry_id,
            "amount": amount,
            "metadata": json.dumps(metadata),
        },
    )
    if (replay := statements.replayed(row, MovementOut)) is not None:
        return replay
    if row.status == "entry_not_found":
        raise entry_not_found()
    if row.status == "exceeds":
        raise refund_exceeds_original(int(row.charged), int(row.refunded))
    reserved = int(row.reserved)
    pool = row.pool  # a member refunds into its pool
    statements.note_expiries(session, pool, reserved, row.expired_tokens, row.expired_balances)
    note_balance_change(
        session,
        user_id=pool,
        balance=int(row.balance),
        tokens_reserved=reserved,
        operation="refund",
    )
    statements.note_expiries(session, pool, reserved, row.ended_tokens, row.ended_balances)
    return MovementOut(**row.response)
