"""A reserve, release or extend in one statement: ``tokens_reserve()``, ``tokens_release()`` and
``tokens_extend()`` (sql/holds/), over ``tokens_hold`` and ``tokens_unhold``.

The replay, the refusals and the events come back from the function's row. Each runs in the
caller's transaction or alone (:mod:`accounting.statements`).
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from accounting import statements
from accounting.errors import (
    idempotency_conflict,
    insufficient_tokens,
    limit_exceeded,
    reservation_not_active,
    reservation_not_found,
)
from accounting.events import note_balance_change
from models.schemas import ExtendOut, ReleaseOut, ReserveOut

_RESERVE = (
    "tokens_reserve(:user_id, :key, :digest, :reservation_id, :amount, :op, :ttl,"
    " CAST(:metadata AS jsonb), :overcapture)"
)
_RELEASE = "tokens_release(:reservation_id, :key, :digest, :reason)"
_EXTEND = "tokens_extend(:reservation_id, :key, :digest, :amount, :ttl)"


def reserve(
    session: Session,
    *,
    user_id: str,
    reservation_id: str,
    amount: int,
    operation_type: str | None,
    ttl_seconds: int,
    metadata: dict[str, Any],
    overcapture_limit: int,
    idempotency_key: str | None,
    digest: str,
) -> ReserveOut:
    """Claim, lock, expire, guard, hold, move and record in one statement; the replay, the
    refusals and the events as the Python path has them."""
    row = statements.call(
        session,
        _RESERVE,
        {
            "user_id": user_id,
            "key": idempotency_key,
            "digest": digest,
            "reservation_id": reservation_id,
            "amount": amount,
            "op": operation_type,
            "ttl": ttl_seconds,
            "metadata": json.dumps(metadata),
            "overcapture": overcapture_limit,
        },
    )
    if (replay := statements.replayed(row, ReserveOut)) is not None:
        return replay
    # The function's balance and reserved are the account's before the hold.
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
        tokens_reserved=reserved + amount,
        operation="reserve",
    )
    return ReserveOut(**row.response)


def release(
    session: Session,
    *,
    reservation_id: str,
    reason: str | None,
    idempotency_key: str | None,
    digest: str,
) -> ReleaseOut:
    """Read, claim, end, lock, unhold, move, expire and record in one statement; the replay,
    the refusals and the events as the Python path has them."""
    row = statements.call(
        session,
        _RELEASE,
        {
            "reservation_id": reservation_id,
            "key": idempotency_key,
            "digest": digest,
            "reason": reason,
        },
    )
    if (replay := _replayed(row, ReleaseOut)) is not None:
        return replay
    # The function's balance and reserved are the account's once the hold is freed.
    reserved = int(row.reserved)
    note_balance_change(
        session,
        user_id=row.owner,
        balance=int(row.balance),
        tokens_reserved=reserved,
        operation="release",
    )
    statements.note_expiries(session, row.owner, reserved, row.expired_tokens, row.expired_balances)
    return ReleaseOut(**row.response)


def extend(
    session: Session,
    *,
    reservation_id: str,
    amount: int,
    ttl_seconds: int | None,
    idempotency_key: str | None,
    digest: str,
) -> ExtendOut:
    """Read, claim, lock, expire, guard, hold more and keep alive in one statement."""
    row = statements.call(
        session,
        _EXTEND,
        {
            "reservation_id": reservation_id,
            "key": idempotency_key,
            "digest": digest,
            "amount": amount,
            "ttl": ttl_seconds,
        },
    )
    if (replay := _replayed(row, ExtendOut)) is not None:
        return replay
    # The function's reserved is the account's once the hold grew (before it, on a refusal);
    # the expiries came before the hold.
    reserved = int(row.reserved)
    held_before = reserved - amount if row.status == "ok" else reserved
    statements.note_expiries(
        session, row.owner, held_before, row.expired_tokens, row.expired_balances
    )
    if row.status == "insufficient":
        raise insufficient_tokens(amount, int(row.available))
    if row.status == "limit":
        raise limit_exceeded(row.refused, amount)
    if amount:
        note_balance_change(
            session,
            user_id=row.owner,
            balance=int(row.balance),
            tokens_reserved=reserved,
            operation="extend",
        )
    return ExtendOut(**row.response)


R = TypeVar("R", ReleaseOut, ExtendOut)


def _replayed(row: Any, result: type[R]) -> R | None:
    """What a release or an extension row says before its effects: the stored outcome of a
    replay, or None; raises the refusals both have (no such reservation, the key names another
    request, the reservation has ended)."""
    if row.status == "not_found":
        raise reservation_not_found()
    if row.status == "replay":
        return result(**row.response)
    if row.status == "conflict":
        raise idempotency_conflict()
    if row.status == "not_active":
        raise reservation_not_active(row.reservation_status)
    return None
