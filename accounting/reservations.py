"""Reservations: hold tokens now, settle (capture, release or expire) exactly once later.

A hold moves ``accounts.tokens_reserved`` only, so ``reserve``, ``release`` and expiry write no
ledger entry; ``capture`` writes one. Every ending is a conditional ``UPDATE … WHERE status =
'active'`` on the reservation row: of a capture, a release and the expiry sweep racing each other,
the first to lock the row wins and the others match nothing. Nothing here commits.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, bindparam, func, insert, literal, select, update
from sqlalchemy.orm import Session

from accounting import clock, idempotency
from accounting.accounts import load_account
from accounting.catalog import known_operation, price_of
from accounting.errors import (
    capture_exceeds_reservation,
    insufficient_tokens,
    invalid_amount,
    reservation_not_active,
    reservation_not_found,
    validation_error,
)
from accounting.events import note_balance_change
from accounting.movements import apply_movement
from models.schemas import MAX_METADATA_BYTES, MovementOut, ReleaseOut, ReserveOut, metadata_bytes
from models.tables import Account, Reservation

ACTIVE = "active"
EXPIRE_CHUNK = 5000
# Serialises expiry sweeps (per database): two overlapping sweeps would otherwise update the
# accounts of their chunks in plan-dependent orders and could deadlock each other.
EXPIRE_LOCK_KEY = 0x7265_7365_7276


def reserve(
    session: Session,
    user_id: str,
    amount: int | None = None,
    operation_type: str | None = None,
    ttl_seconds: int = 900,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> ReserveOut:
    """Hold ``amount`` (or the price of ``operation_type``) until captured, released or expired."""
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
    metadata = metadata or {}
    digest = idempotency.request_hash(
        "reserve",
        amount=amount,
        operation_type=operation_type,
        ttl_seconds=ttl_seconds,
        metadata=metadata,
    )
    replay = idempotency.replay(session, user_id, idempotency_key, digest, ReserveOut)
    if replay is not None:
        return replay

    # The guard is in the statement: concurrent holds serialise on the account row and each
    # re-checks what is left, so they can never together hold more than the balance.
    row = session.execute(
        update(Account)
        .where(
            Account.user_id == user_id,
            Account.tokens_balance - Account.tokens_reserved >= amount,
        )
        .values(
            tokens_reserved=Account.tokens_reserved + amount,
            updated_at=clock.stamp(session, Account.updated_at),
        )
        .returning(Account.tokens_balance, Account.tokens_reserved, Account.updated_at)
        .execution_options(synchronize_session=False)
    ).first()
    if row is None:
        account = load_account(session, user_id)  # raises USER_NOT_FOUND
        raise insufficient_tokens(amount, account.tokens_balance - account.tokens_reserved)
    # The hold's times are the database's, taken under the account's lock.
    balance, reserved, now = row
    reservation_id = str(uuid.uuid4())
    expires_at = now + timedelta(seconds=ttl_seconds)
    session.execute(
        insert(Reservation).values(
            id=reservation_id,
            user_id=user_id,
            amount=amount,
            operation_type=operation_type,
            status=ACTIVE,
            expires_at=expires_at,
            created_at=now,
            meta=metadata,
        )
    )
    note_balance_change(
        session, user_id=user_id, balance=balance, tokens_reserved=reserved, operation="reserve"
    )
    out = ReserveOut(
        reservation_id=reservation_id,
        amount=amount,
        expires_at=expires_at,
        tokens_available=balance - reserved,
    )
    idempotency.record(session, user_id, idempotency_key, out.model_dump(mode="json"))
    return out


def _load(session: Session, reservation_id: str) -> Reservation:
    return _load_at(session, reservation_id)[0]


def _load_at(session: Session, reservation_id: str) -> tuple[Reservation, datetime]:
    """The reservation and the database's time, read together."""
    found = session.execute(
        select(Reservation, clock.now_sql(session))
        .where(Reservation.id == reservation_id)
        .execution_options(populate_existing=True)
    ).one_or_none()
    if found is None:
        raise reservation_not_found()
    return found[0], found[1]


def _status(reservation: Reservation, now: datetime) -> str:
    """What the reservation is for a capture: an active one past its expiry is expired."""
    if reservation.status == ACTIVE and reservation.expires_at <= now:
        return "expired"
    return reservation.status


def _refuse(session: Session, reservation_id: str, now: datetime) -> Exception:
    """The refusal for a reservation a conditional update did not match (re-read: the statement
    that lost the race sees what the winner committed)."""
    return reservation_not_active(_status(_load(session, reservation_id), now))


def capture(
    session: Session,
    reservation_id: str,
    amount: int | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    now: datetime | None = None,
) -> MovementOut:
    """Debit ``amount`` (default: all) of an active reservation and release the rest.

    One ledger entry for the captured amount; the whole hold is freed by the same UPDATE of the
    account. The entry's metadata is the reservation's, then the capture's, plus
    ``reservation_id``.
    """
    if amount is not None and amount <= 0:
        raise invalid_amount("Capture")
    metadata = metadata or {}
    found, db_time = _load_at(session, reservation_id)
    now = now or db_time
    # user_id and amount of a reservation never change, so they may be read without a lock.
    user_id, reserved = found.user_id, found.amount
    digest = idempotency.request_hash(
        "capture", reservation_id=reservation_id, amount=amount, metadata=metadata
    )
    replay = idempotency.replay(session, user_id, idempotency_key, digest, MovementOut)
    if replay is not None:
        return replay
    if (status := _status(found, now)) != ACTIVE:
        raise reservation_not_active(status)
    captured = reserved if amount is None else amount
    if captured > reserved:
        raise capture_exceeds_reservation(reserved, captured)
    # The entry keeps the reservation's metadata, the capture's and the id: bound the whole.
    # (An active reservation's metadata never changes; only a release, which ends it, adds to it.)
    merged = {**found.meta, **metadata, "reservation_id": reservation_id}
    if (size := metadata_bytes(merged)) > MAX_METADATA_BYTES:
        raise validation_error(
            f"Invalid arguments: metadata: merged with the reservation's metadata it is {size} "
            f"bytes serialized; at most {MAX_METADATA_BYTES} allowed"
        )

    ended = session.execute(
        update(Reservation)
        .where(
            Reservation.id == reservation_id,
            Reservation.status == ACTIVE,
            Reservation.expires_at > now,
        )
        .values(status="captured", settled_at=clock.now_sql(session), captured_amount=captured)
        .returning(Reservation.operation_type)
        .execution_options(synchronize_session=False)
    ).first()
    if ended is None:
        raise _refuse(session, reservation_id, now)
    (operation_type,) = ended
    out = apply_movement(
        session,
        user_id=user_id,
        kind="capture",
        operation_type=operation_type or "capture",
        delta=-captured,
        spent_delta=captured,
        release_reserved=reserved,
        metadata=merged,
        idempotency_key=idempotency_key,
    )
    session.execute(
        update(Reservation)
        .where(Reservation.id == reservation_id)
        .values(ledger_entry_id=int(out.ledger_entry_id))
        .execution_options(synchronize_session=False)
    )
    idempotency.record(session, user_id, idempotency_key, out.model_dump(mode="json"))
    return out


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
    found = _load(session, reservation_id)
    user_id = found.user_id
    digest = idempotency.request_hash("release", reservation_id=reservation_id, reason=reason)
    stored = idempotency.claim(session, user_id, idempotency_key, digest)
    if stored is not None:
        return ReleaseOut(**stored)
    if found.status != ACTIVE:
        raise reservation_not_active(found.status)
    ended = session.execute(
        update(Reservation)
        .where(Reservation.id == reservation_id, Reservation.status == ACTIVE)
        .values(status="released", settled_at=clock.now_sql(session))
        .returning(Reservation.amount, Reservation.meta)
        .execution_options(synchronize_session=False)
    ).first()
    if ended is None:
        raise reservation_not_active(_load(session, reservation_id).status)
    held, meta = ended
    if reason is not None:
        # The row is ours (locked by the update above), so this rewrite cannot lose a change.
        session.execute(
            update(Reservation)
            .where(Reservation.id == reservation_id)
            .values(meta={**meta, "release_reason": reason})
            .execution_options(synchronize_session=False)
        )
    balance, reserved = session.execute(
        update(Account)
        .where(Account.user_id == user_id)
        .values(
            tokens_reserved=Account.tokens_reserved - held,
            updated_at=clock.stamp(session, Account.updated_at),
        )
        .returning(Account.tokens_balance, Account.tokens_reserved)
        .execution_options(synchronize_session=False)
    ).one()
    note_balance_change(
        session, user_id=user_id, balance=balance, tokens_reserved=reserved, operation="release"
    )
    out = ReleaseOut(reservation_id=reservation_id, status="released")
    idempotency.record(session, user_id, idempotency_key, out.model_dump(mode="json"))
    return out


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
    """Expire up to ``limit`` active reservations past ``expires_at``; returns how many.

    The caller commits after each batch and calls again while a full batch came back, so a
    backlog of any size is worked off in short transactions of bounded size.
    """
    at = clock.at(session, now)
    if clock.is_postgres(session):
        return _expire_batch_postgresql(session, limit, at)
    return _expire_batch_portable(session, limit, at)


def _expire_batch_postgresql(session: Session, limit: int, now: ColumnElement[datetime]) -> int:
    session.execute(select(func.pg_advisory_xact_lock(EXPIRE_LOCK_KEY)))
    # SKIP LOCKED: rows a capture or release is ending right now are theirs; the status check
    # is re-evaluated on every row locked here, so nothing already ended is expired.
    due = (
        select(Reservation.id)
        # A literal, not a bound parameter: the planner matches the partial index on active
        # reservations only against a condition it can see (a prepared, generic plan cannot).
        .where(Reservation.status == literal(ACTIVE, literal_execute=True))
        .where(Reservation.expires_at <= now)
        .order_by(Reservation.expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    gone = (
        update(Reservation)
        .where(Reservation.id.in_(due.scalar_subquery()))
        .values(status="expired", settled_at=now)
        .returning(Reservation.user_id, Reservation.amount)
        .cte("gone")
    )
    per_user = (
        select(
            gone.c.user_id,
            func.sum(gone.c.amount).label("held"),
            func.count().label("n"),
        )
        .group_by(gone.c.user_id)
        .cte("per_user")
    )
    rows = session.execute(
        update(Account)
        .where(Account.user_id == per_user.c.user_id)
        .values(
            tokens_reserved=Account.tokens_reserved - per_user.c.held,
            updated_at=clock.stamp(session, Account.updated_at),
        )
        .returning(Account.user_id, Account.tokens_balance, Account.tokens_reserved, per_user.c.n)
        .execution_options(synchronize_session=False)
    ).all()
    for user_id, balance, reserved, _n in rows:
        note_balance_change(
            session, user_id=user_id, balance=balance, tokens_reserved=reserved, operation="expire"
        )
    return sum(int(n) for *_, n in rows)


def _expire_batch_portable(session: Session, limit: int, now: ColumnElement[datetime]) -> int:
    # SQLite (the embedded default) admits one writer at a time (BEGIN IMMEDIATE), so this
    # read-then-write cannot interleave with a capture or release.
    due = session.execute(
        select(Reservation.id, Reservation.user_id, Reservation.amount)
        .where(Reservation.status == ACTIVE, Reservation.expires_at <= now)
        .order_by(Reservation.expires_at)
        .limit(limit)
    ).all()
    if not due:
        return 0
    session.execute(
        update(Reservation)
        .where(Reservation.id.in_([r.id for r in due]), Reservation.status == ACTIVE)
        .values(status="expired", settled_at=now)
        .execution_options(synchronize_session=False)
    )
    held: dict[str, int] = defaultdict(int)
    for r in due:
        held[r.user_id] += r.amount
    accounts = cast(Table, Account.__table__)
    session.connection().execute(
        update(accounts)
        .where(accounts.c.user_id == bindparam("uid"))
        .values(
            tokens_reserved=accounts.c.tokens_reserved - bindparam("held"),
            updated_at=clock.stamp(session, accounts.c.updated_at),
        ),
        [{"uid": u, "held": h} for u, h in held.items()],
    )
    changed = session.execute(
        select(Account.user_id, Account.tokens_balance, Account.tokens_reserved).where(
            Account.user_id.in_(list(held))
        )
    )
    for user_id, balance, reserved in changed:
        note_balance_change(
            session, user_id=user_id, balance=balance, tokens_reserved=reserved, operation="expire"
        )
    return len(due)
