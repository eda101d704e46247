"""A credit or a balance reset in one statement: ``tokens_credit()`` and ``tokens_reset()``
(sql/movements/), over ``tokens_grant`` (a new grant pays the debt first), ``tokens_burn`` and
``tokens_write``.

The replay, the refusals and the events come back from the function's row. They run in the
caller's transaction or alone (:mod:`accounting.statements`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from accounting import grants, statements
from accounting.errors import below_reserved, expires_at_not_future, member_account
from accounting.events import note_balance_change
from models.schemas import MovementOut
from models.tables import UTCDateTime

_CREDIT = (
    "tokens_credit(:user_id, :key, :digest, :op, :grant_kind, :amount,"
    " CAST(:priority AS integer), CAST(:expires_at AS timestamptz), CAST(:metadata AS jsonb))"
)
_RESET = (
    "tokens_reset(:user_id, :key, :digest, :op, :new_balance, CAST(:priority AS integer),"
    " CAST(:metadata AS jsonb))"
)


def credit(
    session: Session,
    *,
    user_id: str,
    amount: int,
    operation_type: str,
    grant_kind: str,
    priority: int | None,
    expires_at: datetime | None,
    metadata: dict[str, Any],
    idempotency_key: str | None,
    digest: str,
) -> MovementOut:
    """Claim, lock, expire, check ``expires_at``, grant (paying the debt first), write and
    record in one statement; the replay, the refusals and the events as the Python path has
    them."""
    row = statements.call(
        session,
        _CREDIT,
        {
            "user_id": user_id,
            "key": idempotency_key,
            "digest": digest,
            "op": operation_type,
            "grant_kind": grant_kind,
            "amount": amount,
            "priority": grants.DEFAULT_PRIORITY[grant_kind] if priority is None else priority,
            # Refused naive, as the Python path's grant row would be.
            "expires_at": UTCDateTime().process_bind_param(expires_at, session.get_bind().dialect),
            "metadata": json.dumps(metadata),
        },
    )
    if (replay := statements.replayed(row, MovementOut)) is not None:
        return replay
    statements.note_expiries(
        session, row.pool, int(row.reserved), row.expired_tokens, row.expired_balances
    )
    if row.status == "member":
        raise member_account(row.pool)
    if row.status == "expires_past":
        raise expires_at_not_future()
    return _done(session, user_id, row, "credit")


def reset(
    session: Session,
    *,
    user_id: str,
    new_balance: int,
    operation_type: str,
    metadata: dict[str, Any],
    idempotency_key: str | None,
    digest: str,
) -> MovementOut:
    """Claim, lock, expire, check the reserved tokens, grant the difference (paying the debt
    first) or spend it in burn order, write and record in one statement; the replay, the
    refusals and the events as the Python path has them."""
    row = statements.call(
        session,
        _RESET,
        {
            "user_id": user_id,
            "key": idempotency_key,
            "digest": digest,
            "op": operation_type,
            "new_balance": new_balance,
            "priority": grants.DEFAULT_PRIORITY["adjustment"],
            "metadata": json.dumps(metadata),
        },
    )
    if (replay := statements.replayed(row, MovementOut)) is not None:
        return replay
    statements.note_expiries(
        session, row.pool, int(row.reserved), row.expired_tokens, row.expired_balances
    )
    if row.status == "member":
        raise member_account(row.pool)
    if row.status == "below_reserved":
        raise below_reserved(int(row.reserved))
    return _done(session, user_id, row, "adjustment")


def _done(session: Session, user_id: str, row: Any, kind: str) -> MovementOut:
    note_balance_change(
        session,
        user_id=user_id,
        balance=int(row.balance),
        tokens_reserved=int(row.reserved),
        operation=kind,
    )
    return MovementOut(**row.response)
