"""Reservations: hold tokens now, settle (capture, release or expire) exactly once later.

A hold moves ``accounts.tokens_reserved`` only, so ``reserve``, ``release`` and expiry write no
ledger entry; ``capture`` writes one. Every ending is a conditional ``UPDATE … WHERE status =
'active'`` on the reservation row: of a capture, a release and the expiry sweep racing each other,
the first to lock the row wins and the others match nothing. Nothing here commits.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, literal, select, text
from sqlalchemy.orm import Session

from accounting import capture as capture_statement
from accounting import holds, idempotency
from accounting.catalog import known_operation, price_of
from accounting.errors import (
    invalid_amount,
    validation_error,
)
from accounting.events import note_balance_change
from models.schemas import (
    CaptureOut,
    ExtendOut,
    ReleaseOut,
    ReserveOut,
)
from models.tables import Reservation

ACTIVE = "active"
EXPIRE_CHUNK = 5000
# A hold never lasts past this long after it was made, however often it is extended.
MAX_HOLD = timedelta(seconds=604800)


def reserve(
    session: Session,
    user_id: str,
    amount: int | None = None,
    operation_type: str | None = None,
    ttl_seconds: int = 900,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    overcapture_limit: int = 0,
) -> ReserveOut:
    """Hold ``amount`` (or the price of ``operation_type``) until captured, released or expired.

    The hold is of specific grants, chosen in burn order now; a capture may then take up to
    ``amount + overcapture_limit``."""
    if amount is None and operation_type is None:
        raise validation_error(
            "Invalid arguments: amount: required when operation_type is not given; "
            "operation_type: required when amount is not given"
        )
    if amount is not None and amount <= 0:
        raise invalid_amount("Reserve")
    if amount is None:
        assert operation_type is not None
        amount = price_of(operation_type)
    elif operation_type is not None:
        known_operation(operation_type)
    if overcapture_limit < 0:
        raise validation_error("Invalid arguments: overcapture_limit: must be 0 or more")
    metadata = metadata or {}
    # v1.1's argument enters the digest only when given: a v1 request's digest is unchanged.
    extra = {"overcapture_limit": overcapture_limit} if overcapture_limit else {}
    digest = idempotency.request_hash(
        "reserve",
        amount=amount,
        operation_type=operation_type,
        ttl_seconds=ttl_seconds,
        metadata=metadata,
        **extra,
    )
    reservation_id = str(uuid.uuid4())
    return holds.reserve(
        session,
        user_id=user_id,
        reservation_id=reservation_id,
        amount=amount,
        operation_type=operation_type,
        ttl_seconds=ttl_seconds,
        metadata=metadata,
        overcapture_limit=overcapture_limit,
        idempotency_key=idempotency_key,
        digest=digest,
    )


def capture(
    session: Session,
    reservation_id: str,
    amount: int | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    now: datetime | None = None,
) -> CaptureOut:
    """Spend ``amount`` (default: all the hold) of an active reservation and release the rest.

    The held grants are spent first (even one that has ended meanwhile); past the hold, up to
    its ``overcapture_limit``, the user's free tokens in burn order, and what they do not cover
    becomes debt: the work was done. One ledger entry for the captured amount. Its metadata is
    the reservation's, then the capture's, plus ``reservation_id``.
    """
    if amount is not None and amount <= 0:
        raise invalid_amount("Capture")
    metadata = metadata or {}
    digest = idempotency.request_hash(
        "capture", reservation_id=reservation_id, amount=amount, metadata=metadata
    )
    return capture_statement.capture(
        session,
        reservation_id=reservation_id,
        amount=amount,
        metadata=metadata,
        idempotency_key=idempotency_key,
        digest=digest,
        now=now,
    )


def release(
    session: Session,
    reservation_id: str,
    reason: str | None = None,
    idempotency_key: str | None = None,
) -> ReleaseOut:
    """Free an active reservation's hold (one past its expiry too, ahead of the sweep).

    With ``idempotency_key`` (the task id), a redelivered release returns its first result
    rather than ``Reservation is released``: the release did happen, and its producer should
    hear so.
    """
    digest = idempotency.request_hash("release", reservation_id=reservation_id, reason=reason)
    return holds.release(
        session,
        reservation_id=reservation_id,
        reason=reason,
        idempotency_key=idempotency_key,
        digest=digest,
    )


def extend(
    session: Session,
    reservation_id: str,
    amount: int = 0,
    ttl_seconds: int | None = None,
    idempotency_key: str | None = None,
) -> ExtendOut:
    """Hold ``amount`` more (of the user's available tokens, in burn order) and/or keep the hold
    alive until now + ``ttl_seconds``: never past 7 days after the reservation was made, and
    never earlier than it ends already (an extension that would end it sooner keeps its end).

    Lock order: the key (the task id), the reservation row, then the account. A capture reads
    the hold again under its own conditional update, so it sees what an extension committed.
    """
    if amount < 0:
        raise validation_error("Invalid arguments: amount: must be 0 or more")
    digest = idempotency.request_hash(
        "extend", reservation_id=reservation_id, amount=amount, ttl_seconds=ttl_seconds
    )
    return holds.extend(
        session,
        reservation_id=reservation_id,
        amount=amount,
        ttl_seconds=ttl_seconds,
        idempotency_key=idempotency_key,
        digest=digest,
    )


# Active reservations and the tokens they hold, across all users. The status is a literal: the
# planner matches the partial index on active reservations only against what it can see.
HELD = select(func.count(), func.coalesce(func.sum(Reservation.amount), 0)).where(
    Reservation.status == literal(ACTIVE, literal_execute=True)
)


def held(session: Session) -> tuple[int, int]:
    """How many reservations are active and the tokens they hold, across all users. Read
    through the partial index on active reservations, so the cost follows the holds that exist,
    not the size of the table (the metrics a worker serves read it on each scrape)."""
    count, tokens = session.execute(HELD).one()
    return int(count), int(tokens)


def expire_all(sessions: Callable[[], Session], now: datetime | None = None) -> int:
    """Expire every reservation due at ``now``, committing one transaction per chunk so a large
    backlog never holds its locks for long (like the renewal sweep, it takes a session factory).
    Returns how many expired; after a failure a rerun simply carries on with what is left.
    ``now`` simulates a moment (tests); by default each chunk reads the database's clock."""
    expired = 0
    while True:
        with sessions() as session, session.begin():
            n = expire_batch(session, EXPIRE_CHUNK, now)
        expired += n
        if n < EXPIRE_CHUNK:
            return expired


def expire_batch(session: Session, limit: int = EXPIRE_CHUNK, now: datetime | None = None) -> int:
    """Expire up to ``limit`` active reservations past ``expires_at`` and free their holds
    (``tokens_expire_holds``, sql/holds/); returns how many.

    The caller commits after each batch and calls again while a full batch came back, so a
    backlog of any size is worked off in short transactions of bounded size. Tokens freed in a
    grant that has ended are left to ``grants.expire`` (and to the user's next read or
    movement, which expires them first).
    """
    row = session.execute(_EXPIRE, {"limit": limit, "now": now}).one()
    for user_id, balance, reserved in zip(
        row.users or [], row.balances or [], row.reserveds or [], strict=True
    ):
        note_balance_change(
            session, user_id=user_id, balance=balance, tokens_reserved=reserved, operation="expire"
        )
    return int(row.expired)


_EXPIRE = text("SELECT * FROM tokens_expire_holds(:limit, CAST(:now AS timestamptz))")
