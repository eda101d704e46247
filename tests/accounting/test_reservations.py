"""accounting/reservations.py over a real PostgreSQL session, races included."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

import pytest
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from accounting import accounts, movements, reservations
from accounting.errors import DomainError
from models.schemas import MovementOut, ReleaseOut, ReserveOut
from models.tables import LedgerEntry, Reservation, utcnow
from tests.accounting.grant_helpers import attempt
from tests.support import assert_ledger_consistent, refused, run_in_threads
from worker.db import get_engine

R = TypeVar("R")
ROUNDS = 20  # each race is repeated: one round may happen not to interleave


@pytest.fixture
def sessions() -> Iterator[sessionmaker[Session]]:
    """Sessions on an engine of their own, with a connection per racing thread (the shared
    engine's pool holds 7), warmed up so every thread starts its transaction at once."""
    engine = create_engine(get_engine().url, pool_size=20, max_overflow=0, pool_timeout=60)
    conns = [engine.connect() for _ in range(20)]
    for conn in conns:
        conn.close()
    try:
        yield sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    finally:
        engine.dispose()


def opened(session: Session, user_id: str = "u1", balance: int = 100) -> None:
    accounts.open_account(session, user_id, initial_balance=balance)
    session.commit()


def held(session: Session, user_id: str = "u1") -> tuple[int, int, int]:
    """(balance, tokens_reserved, sum of the user's active reservations)."""
    b = accounts.get_balance(session, user_id)
    active = session.scalar(
        select(func.coalesce(func.sum(Reservation.amount), 0)).where(
            Reservation.user_id == user_id, Reservation.status == "active"
        )
    )
    return b.tokens_balance, b.tokens_reserved, int(active or 0)


def reservation(session: Session, reservation_id: str) -> Reservation:
    session.expire_all()
    found = session.get(Reservation, reservation_id)
    assert found is not None
    return found


def entries(session: Session, user_id: str = "u1", kind: str | None = None) -> list[LedgerEntry]:
    stmt = select(LedgerEntry).where(LedgerEntry.user_id == user_id).order_by(LedgerEntry.id)
    if kind is not None:
        stmt = stmt.where(LedgerEntry.kind == kind)
    return list(session.scalars(stmt))


def snapshot(session: Session) -> list[list[tuple[Any, ...]]]:
    return [
        [tuple(r) for r in session.execute(text(f"SELECT * FROM {t} ORDER BY 1, 2"))]
        for t in ("accounts", "reservations", "ledger_entries", "idempotency_records")
    ]


def fails(session: Session, action: Callable[..., Any], *args: Any, **kw: Any) -> tuple[str, str]:
    """The refusal's (code, message), after checking it changed nothing at all."""
    session.commit()
    before = snapshot(session)
    err = refused(session, action, *args, **kw)
    assert snapshot(session) == before
    return err.code, err.message


def reserved_consistent(session: Session) -> None:
    """tokens_reserved of every account is the sum of its active reservations, never negative."""
    session.expire_all()
    rows = session.execute(
        text(
            """
            SELECT a.user_id, a.tokens_reserved, COALESCE(SUM(r.amount), 0)
            FROM accounts a LEFT JOIN reservations r
              ON r.user_id = a.user_id AND r.status = 'active'
            GROUP BY a.user_id, a.tokens_reserved
            HAVING a.tokens_reserved <> COALESCE(SUM(r.amount), 0) OR a.tokens_reserved < 0
            """
        )
    ).all()
    assert rows == [], f"tokens_reserved differing from the active reservations: {rows}"


# --- reserve -------------------------------------------------------------------------------


def test_reserve_an_amount_holds_it_without_a_ledger_entry(session: Session) -> None:
    opened(session)
    before = utcnow()
    out = reservations.reserve(session, "u1", amount=30, ttl_seconds=60, metadata={"job": "j"})
    session.commit()
    after = utcnow()
    assert (out.success, out.amount, out.tokens_available, out.replayed) == (True, 30, 70, False)
    assert before + timedelta(seconds=60) <= out.expires_at <= after + timedelta(seconds=60)
    assert out.expires_at.utcoffset() == timedelta(0)
    r = reservation(session, out.reservation_id)
    assert (r.user_id, r.amount, r.operation_type, r.status, r.meta) == (
        "u1",
        30,
        None,
        "active",
        {"job": "j"},
    )
    assert r.expires_at == out.expires_at
    assert held(session) == (100, 30, 30)
    assert [e.kind for e in entries(session)] == ["adjustment"]
    assert accounts.get_balance(session, "u1").tokens_available == 70


def test_held_counts_active_reservations_across_users_through_their_index(
    session: Session,
) -> None:
    assert reservations.held(session) == (0, 0)
    opened(session, "u1")
    opened(session, "u2")
    kept = [reservations.reserve(session, u, amount=a) for u, a in (("u1", 30), ("u2", 20))]
    gone = reservations.reserve(session, "u1", amount=5)
    session.commit()
    reservations.release(session, gone.reservation_id)
    session.commit()
    assert reservations.held(session) == (2, 50)
    reservations.capture(session, kept[0].reservation_id)
    session.commit()
    assert reservations.held(session) == (1, 20)
    # The statement can use the partial index (its condition is a literal the planner sees).
    session.execute(text("SET LOCAL enable_seqscan = off"))
    sql = str(reservations.HELD.compile(session.get_bind(), compile_kwargs={"literal_binds": True}))
    plan = "\n".join(r[0] for r in session.execute(text(f"EXPLAIN {sql}")))
    assert "ix_reservations_active_expiry" in plan, plan


def test_reserve_an_operation_type_holds_its_price(session: Session) -> None:
    opened(session)
    out = reservations.reserve(session, "u1", operation_type="chatgpt_message")
    session.commit()
    assert out.amount == 5
    r = reservation(session, out.reservation_id)
    assert (r.amount, r.operation_type) == (5, "chatgpt_message")
    # Default ttl: 900 seconds.
    assert timedelta(seconds=899) < r.expires_at - r.created_at <= timedelta(seconds=900)


def test_reserve_with_amount_and_operation_type_holds_the_amount(session: Session) -> None:
    opened(session)
    out = reservations.reserve(session, "u1", amount=42, operation_type="image_generation")
    session.commit()
    r = reservation(session, out.reservation_id)
    assert (r.amount, r.operation_type) == (42, "image_generation")
    assert held(session) == (100, 42, 42)


@pytest.mark.parametrize(
    ("kwargs", "code", "message"),
    [
        (
            {},
            "VALIDATION_ERROR",
            "Invalid arguments: amount: required when operation_type is not given; "
            "operation_type: required when amount is not given",
        ),
        ({"amount": 0}, "INVALID_AMOUNT", "Reserve amount must be positive"),
        ({"amount": -5}, "INVALID_AMOUNT", "Reserve amount must be positive"),
        ({"operation_type": "nope"}, "UNKNOWN_OPERATION_TYPE", "Unknown operation type: nope"),
        (
            {"amount": 5, "operation_type": "nope"},
            "UNKNOWN_OPERATION_TYPE",
            "Unknown operation type: nope",
        ),
        ({"operation_type": "refund"}, "NOT_CHARGEABLE", "Operation type refund has no cost"),
        (
            {"amount": 101},
            "INSUFFICIENT_TOKENS",
            "Insufficient tokens. Required: 101, Available: 100",
        ),
    ],
)
def test_reserve_refusals(
    session: Session, kwargs: dict[str, Any], code: str, message: str
) -> None:
    opened(session)
    assert fails(session, reservations.reserve, "u1", **kwargs) == (code, message)


def test_reserve_for_an_unknown_user(session: Session) -> None:
    assert fails(session, reservations.reserve, "ghost", amount=5) == (
        "USER_NOT_FOUND",
        "User not found",
    )


def test_reserved_tokens_are_unavailable_to_debits_charges_and_reservations(
    session: Session,
) -> None:
    opened(session)
    reservations.reserve(session, "u1", amount=95)
    session.commit()
    insufficient = ("INSUFFICIENT_TOKENS", "Insufficient tokens. Required: 10, Available: 5")
    assert fails(session, movements.debit, "u1", 10, "image_generation") == insufficient
    assert fails(session, movements.charge, "u1", "image_generation") == insufficient
    assert fails(session, reservations.reserve, "u1", amount=10) == insufficient
    # What is left stays usable.
    reservations.reserve(session, "u1", amount=5)
    session.commit()
    assert held(session) == (100, 100, 100)


def test_reserve_replays_its_key_and_refuses_it_for_other_parameters(session: Session) -> None:
    opened(session)
    first = reservations.reserve(session, "u1", amount=30, idempotency_key="k")
    session.commit()
    again = reservations.reserve(session, "u1", amount=30, idempotency_key="k")
    session.commit()
    assert again == first.model_copy(update={"replayed": True})
    assert fails(session, reservations.reserve, "u1", amount=31, idempotency_key="k") == (
        "IDEMPOTENCY_CONFLICT",
        "Idempotency key reused with different parameters",
    )
    assert held(session) == (100, 30, 30)
    assert session.scalar(select(func.count()).select_from(Reservation)) == 1


def test_fifty_simultaneous_reservations_of_30_on_1000_hold_exactly_33(
    session: Session, sessions: sessionmaker[Session]
) -> None:
    opened(session, balance=1000)
    outcomes = run_in_threads(
        50, lambda i: attempt(sessions, reservations.reserve, "u1", amount=30)
    )
    ok = [o for o in outcomes if isinstance(o, ReserveOut)]
    refusals = [o for o in outcomes if isinstance(o, DomainError)]
    assert len(ok) == 33
    assert len(refusals) == 17
    assert {e.message for e in refusals} == {"Insufficient tokens. Required: 30, Available: 10"}
    assert sorted(o.tokens_available for o in ok) == list(range(10, 1000, 30))
    assert held(session) == (1000, 990, 990)
    reserved_consistent(session)


# --- capture -------------------------------------------------------------------------------


def test_capture_all_debits_the_hold_with_one_entry(session: Session) -> None:
    opened(session)
    r = reservations.reserve(session, "u1", operation_type="image_generation", metadata={"a": 1})
    session.commit()
    out = reservations.capture(session, r.reservation_id, metadata={"b": 2}, idempotency_key="t1")
    session.commit()
    assert out.model_dump() == {
        "success": True,
        "user_id": "u1",
        "operation_type": "image_generation",
        "amount": -10,
        "balance_before": 100,
        "new_balance": 90,
        "tokens_spent": 10,
        "ledger_entry_id": out.ledger_entry_id,
        "replayed": False,
        "overcaptured": 0,
        "shortfall": 0,
    }
    (e,) = entries(session, kind="capture")
    assert (e.id, e.operation_type, e.tokens_amount, e.balance_before, e.balance_after) == (
        int(out.ledger_entry_id),
        "image_generation",
        -10,
        100,
        90,
    )
    assert e.meta == {"a": 1, "b": 2, "reservation_id": r.reservation_id}
    assert e.idempotency_key == "t1"
    row = reservation(session, r.reservation_id)
    assert (row.status, row.captured_amount, row.ledger_entry_id) == ("captured", 10, e.id)
    assert row.settled_at is not None
    assert held(session) == (90, 0, 0)
    assert_ledger_consistent(session)


def test_partial_capture_releases_the_rest(session: Session) -> None:
    opened(session)
    other = reservations.reserve(session, "u1", amount=20)
    r = reservations.reserve(session, "u1", amount=30)
    session.commit()
    out = reservations.capture(session, r.reservation_id, amount=12)
    session.commit()
    assert (out.operation_type, out.amount, out.balance_before, out.new_balance) == (
        "capture",
        -12,
        100,
        88,
    )
    assert out.tokens_spent == 12
    assert held(session) == (88, 20, 20)
    assert accounts.get_balance(session, "u1").tokens_available == 68
    assert reservation(session, r.reservation_id).captured_amount == 12
    assert reservation(session, other.reservation_id).status == "active"
    assert_ledger_consistent(session)


def test_capture_succeeds_even_when_the_balance_has_fallen_below_the_hold(
    session: Session,
) -> None:
    # The hold was granted; settling it must not depend on what happened to the balance since.
    opened(session)
    r = reservations.reserve(session, "u1", amount=30)
    movements.debit(session, "u1", 90, "image_generation", allow_overdraft=True)
    session.commit()
    out = reservations.capture(session, r.reservation_id)
    session.commit()
    assert out.new_balance == -20
    assert held(session) == (-20, 0, 0)
    assert_ledger_consistent(session)


def test_capture_replays_its_key(session: Session) -> None:
    opened(session)
    r = reservations.reserve(session, "u1", amount=30)
    session.commit()
    first = reservations.capture(session, r.reservation_id, amount=20, idempotency_key="task-1")
    session.commit()
    again = reservations.capture(session, r.reservation_id, amount=20, idempotency_key="task-1")
    session.commit()
    assert again == first.model_copy(update={"replayed": True})
    assert fails(
        session, reservations.capture, r.reservation_id, amount=10, idempotency_key="task-1"
    ) == ("IDEMPOTENCY_CONFLICT", "Idempotency key reused with different parameters")
    assert len(entries(session, kind="capture")) == 1
    assert held(session) == (80, 0, 0)


def test_capture_metadata_merged_with_the_reservations_stays_within_8_kib(
    session: Session,
) -> None:
    """The confirmed defect: each part within 8 KiB, the merged entry metadata over it."""
    opened(session)
    r = reservations.reserve(session, "u1", amount=30, metadata={"a": "x" * 5000})
    session.commit()
    code, message = fails(
        session, reservations.capture, r.reservation_id, metadata={"b": "y" * 5000}
    )
    assert code == "VALIDATION_ERROR"
    assert message.startswith("Invalid arguments: metadata: merged with the reservation's")
    assert message.endswith("at most 8192 allowed")
    assert reservation(session, r.reservation_id).status == "active"
    # A capture whose merged metadata fits goes through, and its entry is within the bound.
    out = reservations.capture(session, r.reservation_id, metadata={"b": "y" * 2000})
    session.commit()
    stored = session.get_one(LedgerEntry, int(out.ledger_entry_id)).meta
    assert len(json.dumps(stored, separators=(",", ":")).encode()) <= 8192
    assert stored["reservation_id"] == r.reservation_id


def test_capture_refusals(session: Session) -> None:
    opened(session)
    r = reservations.reserve(session, "u1", amount=30).reservation_id
    session.commit()
    assert fails(session, reservations.capture, "no-such-id") == (
        "RESERVATION_NOT_FOUND",
        "Reservation not found",
    )
    for bad in (0, -1):
        assert fails(session, reservations.capture, r, amount=bad) == (
            "INVALID_AMOUNT",
            "Capture amount must be positive",
        )
    assert fails(session, reservations.capture, r, amount=31) == (
        "CAPTURE_EXCEEDS_RESERVATION",
        "Capture exceeds reservation. Reserved: 30, Requested: 31",
    )
    reservations.capture(session, r, idempotency_key="first")
    session.commit()
    assert fails(session, reservations.capture, r, idempotency_key="second") == (
        "RESERVATION_NOT_ACTIVE",
        "Reservation is captured",
    )


def test_capture_of_a_released_or_expired_reservation_is_refused(session: Session) -> None:
    opened(session)
    released = reservations.reserve(session, "u1", amount=10).reservation_id
    expired = reservations.reserve(session, "u1", amount=10, ttl_seconds=1).reservation_id
    session.commit()
    reservations.release(session, released)
    assert reservations.expire_batch(session, now=utcnow() + timedelta(seconds=5)) == 1
    session.commit()
    assert fails(session, reservations.capture, released) == (
        "RESERVATION_NOT_ACTIVE",
        "Reservation is released",
    )
    assert fails(session, reservations.capture, expired) == (
        "RESERVATION_NOT_ACTIVE",
        "Reservation is expired",
    )


def test_capture_past_expiry_is_refused_before_the_sweep_and_changes_nothing(
    session: Session,
) -> None:
    opened(session)
    r = reservations.reserve(session, "u1", amount=30).reservation_id
    session.commit()
    late = utcnow() + timedelta(seconds=901)
    assert fails(session, reservations.capture, r, now=late) == (
        "RESERVATION_NOT_ACTIVE",
        "Reservation is expired",
    )
    assert reservation(session, r).status == "active"
    assert held(session) == (100, 30, 30)


# --- release -------------------------------------------------------------------------------


def test_release_frees_the_hold_without_a_ledger_entry(session: Session) -> None:
    opened(session)
    keep = reservations.reserve(session, "u1", amount=20)
    r = reservations.reserve(session, "u1", amount=30, metadata={"job": "j"})
    session.commit()
    out = reservations.release(session, r.reservation_id, reason="cancelled", idempotency_key="t")
    session.commit()
    assert out.model_dump() == {
        "success": True,
        "reservation_id": r.reservation_id,
        "status": "released",
    }
    row = reservation(session, r.reservation_id)
    assert (row.status, row.captured_amount, row.ledger_entry_id) == ("released", None, None)
    assert row.meta == {"job": "j", "release_reason": "cancelled"}
    assert row.settled_at is not None
    assert held(session) == (100, 20, 20)
    assert reservation(session, keep.reservation_id).status == "active"
    assert [e.kind for e in entries(session)] == ["adjustment"]


def test_release_replays_the_same_task_and_refuses_another(session: Session) -> None:
    opened(session)
    keep = reservations.reserve(session, "u1", amount=20)
    r = reservations.reserve(session, "u1", amount=30).reservation_id
    session.commit()
    first = reservations.release(session, r, idempotency_key="task-1")
    session.commit()
    # A redelivered message: the release happened, so its producer hears success again.
    assert reservations.release(session, r, idempotency_key="task-1") == first
    session.commit()
    assert held(session) == (100, 20, 20)
    assert fails(session, reservations.release, r, idempotency_key="task-2") == (
        "RESERVATION_NOT_ACTIVE",
        "Reservation is released",
    )
    assert fails(session, reservations.release, r) == (
        "RESERVATION_NOT_ACTIVE",
        "Reservation is released",
    )
    assert held(session) == (100, 20, 20)
    assert reservation(session, keep.reservation_id).status == "active"


def test_release_refusals(session: Session) -> None:
    opened(session)
    captured = reservations.reserve(session, "u1", amount=10).reservation_id
    expired = reservations.reserve(session, "u1", amount=10, ttl_seconds=1).reservation_id
    session.commit()
    reservations.capture(session, captured)
    reservations.expire_batch(session, now=utcnow() + timedelta(seconds=5))
    session.commit()
    assert fails(session, reservations.release, "no-such-id") == (
        "RESERVATION_NOT_FOUND",
        "Reservation not found",
    )
    assert fails(session, reservations.release, captured) == (
        "RESERVATION_NOT_ACTIVE",
        "Reservation is captured",
    )
    assert fails(session, reservations.release, expired) == (
        "RESERVATION_NOT_ACTIVE",
        "Reservation is expired",
    )


def test_release_past_expiry_is_allowed_before_the_sweep(session: Session) -> None:
    opened(session)
    r = reservations.reserve(session, "u1", amount=30).reservation_id
    session.execute(
        text("UPDATE reservations SET expires_at = now() - interval '1 minute' WHERE id = :r"),
        {"r": r},
    )
    session.commit()
    assert reservations.release(session, r).status == "released"
    session.commit()
    assert held(session) == (100, 0, 0)
    assert reservations.expire_batch(session) == 0


# --- expire --------------------------------------------------------------------------------


def test_expire_releases_only_reservations_past_expiry(session: Session) -> None:
    opened(session, "a")
    opened(session, "b")
    now = utcnow()
    a1 = reservations.reserve(session, "a", amount=10, ttl_seconds=60).reservation_id
    a2 = reservations.reserve(session, "a", amount=20, ttl_seconds=120).reservation_id
    a3 = reservations.reserve(session, "a", amount=5, ttl_seconds=3600).reservation_id
    b1 = reservations.reserve(session, "b", amount=7, ttl_seconds=60).reservation_id
    captured = reservations.reserve(session, "b", amount=3, ttl_seconds=60).reservation_id
    session.commit()
    reservations.capture(session, captured)
    session.commit()
    later = now + timedelta(seconds=600)
    assert reservations.expire_batch(session, now=later) == 3
    session.commit()
    assert [reservation(session, r).status for r in (a1, a2, a3, b1, captured)] == [
        "expired",
        "expired",
        "active",
        "expired",
        "captured",
    ]
    assert reservation(session, a1).settled_at == later
    assert held(session, "a") == (100, 5, 5)
    assert held(session, "b") == (97, 0, 0)
    # Nothing left to expire; no ledger entries written by expiry.
    assert reservations.expire_batch(session, now=later) == 0
    assert [e.kind for e in entries(session, "a")] == ["adjustment"]
    reserved_consistent(session)


def test_expire_works_in_chunks_oldest_first(session: Session) -> None:
    opened(session, balance=1000)
    ids = [
        reservations.reserve(session, "u1", amount=10, ttl_seconds=60 + i).reservation_id
        for i in range(5)
    ]
    session.commit()
    later = utcnow() + timedelta(hours=1)
    counts = []
    while True:
        counts.append(reservations.expire_batch(session, limit=2, now=later))
        session.commit()
        statuses = [reservation(session, r).status for r in ids]
        if counts[-1] < 2:
            break
        # Oldest expiry first: a chunk takes the front of the queue.
        assert statuses == ["expired"] * sum(counts) + ["active"] * (5 - sum(counts))
        reserved_consistent(session)
    assert counts == [2, 2, 1]
    assert held(session) == (1000, 0, 0)


def test_two_sweeps_at_once_expire_each_reservation_once(
    session: Session, sessions: sessionmaker[Session]
) -> None:
    users = [f"u{i}" for i in range(20)]
    for u in users:
        accounts.open_account(session, u, initial_balance=1000)
    for i in range(400):
        reservations.reserve(session, users[i % 20], amount=1 + i % 7)
    session.commit()
    later = utcnow() + timedelta(hours=1)

    def sweep(_: int) -> int:
        total = 0
        with sessions() as s:
            while True:
                n = reservations.expire_batch(s, limit=50, now=later)
                s.commit()
                total += n
                if n < 50:
                    return total

    assert sum(run_in_threads(3, sweep)) == 400
    assert session.scalar(select(func.count()).where(Reservation.status != "expired")) == 0
    reserved_consistent(session)
    assert [held(session, u)[1] for u in users] == [0] * 20


# --- races ---------------------------------------------------------------------------------


def assert_ended_once(session: Session, user_id: str, reservation_id: str, how: str) -> None:
    assert reservation(session, reservation_id).status == how
    captures = entries(session, user_id, "capture")
    assert len(captures) == (1 if how == "captured" else 0)
    reserved_consistent(session)
    assert_ledger_consistent(session)


def race(*racers: Callable[[], Any]) -> list[Any]:
    return run_in_threads(len(racers), lambda i: racers[i]())


def test_capture_racing_release_ends_exactly_once(
    session: Session, sessions: sessionmaker[Session]
) -> None:
    for round_ in range(ROUNDS):
        user = f"race{round_}"
        opened(session, user, balance=100)
        reservations.reserve(session, user, amount=15)  # stays active: a double release shows
        r = reservations.reserve(session, user, amount=30).reservation_id
        session.commit()
        captured, released = race(
            partial(attempt, sessions, reservations.capture, r, amount=20),
            partial(attempt, sessions, reservations.release, r),
        )
        if isinstance(captured, MovementOut):
            assert isinstance(released, DomainError)
            assert (released.code, released.message) == (
                "RESERVATION_NOT_ACTIVE",
                "Reservation is captured",
            )
            assert_ended_once(session, user, r, "captured")
            assert held(session, user) == (80, 15, 15)
        else:
            assert isinstance(captured, DomainError)
            assert (captured.code, captured.message) == (
                "RESERVATION_NOT_ACTIVE",
                "Reservation is released",
            )
            assert released == ReleaseOut(reservation_id=r, status="released")
            assert_ended_once(session, user, r, "released")
            assert held(session, user) == (100, 15, 15)


def test_capture_racing_the_expiry_sweep_ends_exactly_once(
    session: Session, sessions: sessionmaker[Session]
) -> None:
    # The sweep runs with a clock past the expiry while the capture runs with the real one, so
    # each on its own would succeed: only the status guard keeps them from both ending it.
    later = utcnow() + timedelta(hours=1)
    for round_ in range(ROUNDS):
        user = f"race{round_}"
        opened(session, user, balance=100)
        reservations.reserve(session, user, amount=15, ttl_seconds=7200)  # not yet due
        r = reservations.reserve(session, user, amount=30).reservation_id
        session.commit()
        captured, swept = race(
            partial(attempt, sessions, reservations.capture, r),
            partial(attempt, sessions, reservations.expire_batch, now=later),
        )
        if isinstance(captured, MovementOut):
            assert swept == 0
            assert_ended_once(session, user, r, "captured")
            assert held(session, user) == (70, 15, 15)
        else:
            assert isinstance(captured, DomainError)
            assert (captured.code, captured.message) == (
                "RESERVATION_NOT_ACTIVE",
                "Reservation is expired",
            )
            assert swept == 1
            assert_ended_once(session, user, r, "expired")
            assert held(session, user) == (100, 15, 15)
