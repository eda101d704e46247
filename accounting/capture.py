"""A capture in one statement: ``tokens_capture()`` (sql/movements/tokens_capture.sql).

The replay, the refusals and the events come back from its row. It runs in the caller's
transaction or alone (:mod:`accounting.statements`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from accounting import statements
from accounting.errors import (
    capture_exceeds_reservation,
    merged_metadata_too_large,
    reservation_not_active,
    reservation_not_found,
)
from accounting.events import note_balance_change
from models.schemas import MAX_METADATA_BYTES, CaptureOut, metadata_bytes

_CALL = (
    "tokens_capture(:reservation_id, :amount, CAST(:metadata AS jsonb), :tail_bytes,"
    " :max_bytes, :key, :digest, :now)"
)


def capture(
    session: Session,
    *,
    reservation_id: str,
    amount: int | None,
    metadata: dict[str, Any],
    idempotency_key: str | None,
    digest: str,
    now: datetime | None,
) -> CaptureOut:
    """Read, claim, check, end, lock, expire, spend, write and record in one statement; the
    replay, the refusals and the events as the Python path has them."""
    row = statements.call(
        session,
        _CALL,
        {
            "reservation_id": reservation_id,
            "amount": amount,
            "metadata": json.dumps(metadata),
            # What the capture adds to the entry's metadata, sized here as Python writes it.
            "tail_bytes": metadata_bytes({**metadata, "reservation_id": reservation_id}),
            "max_bytes": MAX_METADATA_BYTES,
            "key": idempotency_key,
            "digest": digest,
            "now": now,
        },
    )
    if (replay := statements.replayed(row, CaptureOut)) is not None:
        return replay
    if row.status == "reservation_not_found":
        raise reservation_not_found()
    if row.status == "not_active":
        raise reservation_not_active(row.reservation_status)
    if row.status == "exceeds":
        raise capture_exceeds_reservation(int(row.bound), int(row.captured))
    if row.status == "metadata":
        raise merged_metadata_too_large(int(row.metadata_bytes), MAX_METADATA_BYTES)
    out = CaptureOut(**row.response)
    reserved = int(row.reserved)
    # Due grants expired under the hold, the capture, then what it freed of ended grants.
    held = reserved + int(row.hold)
    statements.note_expiries(session, out.user_id, held, row.expired_tokens, row.expired_balances)
    note_balance_change(
        session,
        user_id=out.user_id,
        balance=out.new_balance,
        tokens_reserved=reserved,
        operation="capture",
    )
    statements.note_expiries(session, out.user_id, reserved, row.ended_tokens, row.ended_balances)
    return out
