"""Settlement of metered usage (contract v1.1): over-capture within a bound, and tokens.extend."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from accounting import accounts, clock, grants, ledger, movements, reservations
from models.schemas import CaptureOut, ExtendOut
from tests.accounting.grant_helpers import attempt, race, racing_sessions
from tests.support import assert_ledger_consistent, refused

TABLES = ("accounts", "grants", "reservations", "reservation_grants", "ledger_entries")


def snapshot(session: Session) -> list[list[tuple[Any, ...]]]:
    return [
        [tuple(r) for r in session.execute(text(f"SELECT * FROM {t} ORDER BY 1"))] for t in TABLES
    ]


def fails(session: Session, action: Callable[..., Any], *args: Any, **kw: Any) -> tuple[str, str]:
    """The refusal's (code, message), after checking it changed nothing, grants included."""
    session.commit()
    before = snapshot(session)
    err = refused(session, action, *args, **kw)
    assert snapshot(session) == before
    return err.code, err.message


def opened(session: Session, user_id: str = "u1", balance: int = 100) -> None:
    accounts.open_account(session, user_id, initial_balance=balance)
    session.commit()


def held_by_grant(session: Session, user_id: str = "u1") -> dict[str, int]:
    """What reservations hold of each of the user's active grants, by kind."""
    return {g.kind: g.held for g in grants.list_grants(session, user_id).grants}


def splits(session: Session, entry_id: str, user_id: str = "u1") -> list[tuple[str, int]]:
    """The entry's split as (grant kind, amount), in the order applied."""
    kinds = {g.grant_id: g.kind for g in grants.list_grants(session, user_id, True).grants}
    (entry,) = [e for e in ledger.user_entries(session, user_id).entries if e.id == entry_id]
    return [(kinds[s.grant_id], s.amount) for s in entry.grants]


# --- over-capture ------------------------------------------------------------------------------


@pytest.mark.parametrize(("captured", "over"), [(30, 0), (35, 5), (40, 10)])
def test_capture_up_to_the_hold_plus_its_limit_spends_available_tokens(
    session: Session, captured: int, over: int
) -> None:
    opened(session)
    r = reservations.reserve(session, "u1", amount=30, overcapture_limit=10)
    session.commit()
    out = reservations.capture(session, r.reservation_id, amount=captured)
    session.commit()
    assert (out.amount, out.new_balance, out.overcaptured, out.shortfall) == (
        -captured,
        100 - captured,
        over,
        0,
    )
    b = accounts.get_balance(session, "u1")
    assert (b.tokens_reserved, b.tokens_spent, b.debt) == (0, captured, 0)
    assert_ledger_consistent(session)


def test_capture_beyond_the_limit_is_refused_naming_hold_plus_limit(session: Session) -> None:
    opened(session)
    r = reservations.reserve(session, "u1", amount=30, overcapture_limit=10)
    v1 = reservations.reserve(session, "u1", amount=30)
    session.commit()
    assert fails(session, reservations.capture, r.reservation_id, amount=41) == (
        "CAPTURE_EXCEEDS_RESERVATION",
        "Capture exceeds reservation. Reserved: 40, Requested: 41",
    )
    # Without a limit (the v1 default) the bound is the hold itself.
    assert fails(session, reservations.capture, v1.reservation_id, amount=31) == (
        "CAPTURE_EXCEEDS_RESERVATION",
        "Capture exceeds reservation. Reserved: 30, Requested: 31",
    )
    assert_ledger_consistent(session)


@pytest.mark.parametrize(("balance", "shortfall"), [(30, 10), (35, 5)])
def test_over_capture_without_enough_available_tokens_becomes_debt_paid_by_the_next_credit(
    session: Session, balance: int, shortfall: int
) -> None:
    # The work was done: within its bound a capture never fails for want of tokens.
    opened(session, balance=balance)
    r = reservations.reserve(session, "u1", amount=30, overcapture_limit=10)
    session.commit()
    out = reservations.capture(session, r.reservation_id, amount=40)
    session.commit()
    assert (out.new_balance, out.overcaptured, out.shortfall) == (balance - 40, 10, shortfall)
    assert splits(session, out.ledger_entry_id) == [("adjustment", -(40 - shortfall))]
    b = accounts.get_balance(session, "u1")
    assert (b.tokens_balance, b.debt, b.by_kind) == (-shortfall, shortfall, {})
    credited = movements.credit(session, "u1", 25)
    session.commit()
    assert credited.new_balance == 25 - shortfall
    (purchase,) = grants.list_grants(session, "u1").grants
    assert (purchase.amount, purchase.remaining) == (25, 25 - shortfall)
    assert grants.list_grants(session, "u1").debt == 0
    assert_ledger_consistent(session)


def test_over_capture_never_takes_what_other_reservations_hold(session: Session) -> None:
    opened(session)
    r = reservations.reserve(session, "u1", amount=30, overcapture_limit=50)
    other = reservations.reserve(session, "u1", amount=60)
    session.commit()
    out = reservations.capture(session, r.reservation_id, amount=80)
    session.commit()
    # 30 held + the 10 available; the other 40 are debt, and the other hold keeps its 60.
    assert (out.new_balance, out.overcaptured, out.shortfall) == (20, 50, 40)
    b = accounts.get_balance(session, "u1")
    assert (b.tokens_reserved, b.tokens_available, b.debt) == (60, -40, 40)
    assert held_by_grant(session) == {"adjustment": 60}
    assert reservations.capture(session, other.reservation_id).new_balance == -40
    session.commit()
    assert_ledger_consistent(session)


def test_over_capture_spends_the_hold_then_free_grants_in_burn_order(session: Session) -> None:
    opened(session, balance=0)
    movements.credit(session, "u1", 10, grant_kind="promo")  # priority 20
    movements.credit(session, "u1", 100)  # purchased, priority 50
    r = reservations.reserve(session, "u1", amount=15, overcapture_limit=20)
    session.commit()
    assert held_by_grant(session) == {"promo": 10, "purchased": 5}
    out = reservations.capture(session, r.reservation_id, amount=35)
    session.commit()
    # One split per grant: the hold's 5 and the 20 beyond it of the same purchase.
    assert splits(session, out.ledger_entry_id) == [("promo", -10), ("purchased", -25)]
    assert (out.overcaptured, out.shortfall, out.new_balance) == (20, 0, 75)
    assert_ledger_consistent(session)


def test_a_replayed_over_capture_returns_the_same_result(session: Session) -> None:
    opened(session, balance=35)
    r = reservations.reserve(session, "u1", amount=30, overcapture_limit=10)
    session.commit()
    first = reservations.capture(session, r.reservation_id, amount=40, idempotency_key="t1")
    session.commit()
    again = reservations.capture(session, r.reservation_id, amount=40, idempotency_key="t1")
    session.commit()
    assert isinstance(again, CaptureOut)
    assert again == first.model_copy(update={"replayed": True})
    assert (again.overcaptured, again.shortfall) == (10, 5)
    assert accounts.get_balance(session, "u1").tokens_balance == -5
    assert_ledger_consistent(session)


def test_overcapture_limit_must_not_be_negative(session: Session) -> None:
    opened(session)
    code, message = fails(session, reservations.reserve, "u1", amount=10, overcapture_limit=-1)
    assert (code, "overcapture_limit" in message) == ("VALIDATION_ERROR", True)


# --- extend --------------------------------------------------------------------------------------


def test_extend_holds_more_of_the_available_tokens_in_burn_order(session: Session) -> None:
    opened(session, balance=0)
    movements.credit(session, "u1", 30, grant_kind="promo")
    movements.credit(session, "u1", 100)
    r = reservations.reserve(session, "u1", amount=20)
    session.commit()
    out = reservations.extend(session, r.reservation_id, amount=30)
    session.commit()
    assert out == ExtendOut(
        reservation_id=r.reservation_id, amount=50, expires_at=r.expires_at, tokens_available=80
    )
    assert held_by_grant(session) == {"promo": 30, "purchased": 20}
    assert accounts.get_balance(session, "u1").tokens_reserved == 50
    captured = reservations.capture(session, r.reservation_id)
    session.commit()
    assert (captured.amount, captured.overcaptured) == (-50, 0)
    assert splits(session, captured.ledger_entry_id) == [("promo", -30), ("purchased", -20)]
    assert_ledger_consistent(session)


def test_extend_beyond_the_available_tokens_is_refused(session: Session) -> None:
    opened(session, balance=50)
    r = reservations.reserve(session, "u1", amount=30)
    reservations.reserve(session, "u1", amount=10)
    session.commit()
    assert fails(session, reservations.extend, r.reservation_id, amount=11) == (
        "INSUFFICIENT_TOKENS",
        "Insufficient tokens. Required: 11, Available: 10",
    )
    assert reservations.extend(session, r.reservation_id, amount=10).tokens_available == 0
    session.commit()
    assert_ledger_consistent(session)


def test_extend_moves_the_expiry_later_but_never_past_seven_days_after_the_reservation(
    session: Session,
) -> None:
    opened(session)
    r = reservations.reserve(session, "u1", amount=10, ttl_seconds=60)
    session.commit()
    before = clock.db_now(session)
    out = reservations.extend(session, r.reservation_id, ttl_seconds=3600)
    session.commit()
    assert (
        before + timedelta(seconds=3600)
        <= out.expires_at
        <= clock.db_now(session) + timedelta(seconds=3600)
    )
    assert out.amount == 10
    # Made almost 7 days ago: a day more would pass the 7 days, so it stops there.
    session.execute(text("UPDATE reservations SET created_at = now() - interval '6 days 23 hours'"))
    session.commit()
    created = reservations.extend(session, r.reservation_id, ttl_seconds=86400)
    session.commit()
    row = session.execute(text("SELECT created_at, expires_at FROM reservations")).one()
    assert row.expires_at == row.created_at + timedelta(seconds=604800) == created.expires_at
    # A shorter ttl keeps the end it has: an extension keeps a hold alive, never ends it
    # sooner (issue 21: `extend --ttl-seconds 600` cut a hold with days left to ten minutes).
    shorter = reservations.extend(session, r.reservation_id, ttl_seconds=5)
    session.commit()
    assert shorter.expires_at == created.expires_at
    assert session.execute(text("SELECT expires_at FROM reservations")).scalar_one() == (
        created.expires_at
    )
    assert_ledger_consistent(session)


def test_extend_of_an_ended_reservation_is_refused_with_its_status(session: Session) -> None:
    opened(session)
    released = reservations.reserve(session, "u1", amount=10).reservation_id
    captured = reservations.reserve(session, "u1", amount=10).reservation_id
    due = reservations.reserve(session, "u1", amount=10).reservation_id
    reservations.release(session, released)
    reservations.capture(session, captured)
    session.execute(
        text("UPDATE reservations SET expires_at = now() - interval '1 second' WHERE id = :r"),
        {"r": due},
    )
    for rid, status in ((released, "released"), (captured, "captured"), (due, "expired")):
        assert fails(session, reservations.extend, rid, amount=5, ttl_seconds=60) == (
            "RESERVATION_NOT_ACTIVE",
            f"Reservation is {status}",
        )
    assert fails(session, reservations.extend, "nope", amount=5) == (
        "RESERVATION_NOT_FOUND",
        "Reservation not found",
    )
    assert_ledger_consistent(session)


def test_extend_replays_its_task_id(session: Session) -> None:
    opened(session)
    r = reservations.reserve(session, "u1", amount=10)
    session.commit()
    first = reservations.extend(session, r.reservation_id, amount=5, idempotency_key="t1")
    session.commit()
    again = reservations.extend(session, r.reservation_id, amount=5, idempotency_key="t1")
    session.commit()
    assert again == first
    assert accounts.get_balance(session, "u1").tokens_reserved == 15
    assert fails(
        session, reservations.extend, r.reservation_id, amount=6, idempotency_key="t1"
    ) == ("IDEMPOTENCY_CONFLICT", "Idempotency key reused with different parameters")
    assert_ledger_consistent(session)


@pytest.fixture
def sessions() -> Iterator[sessionmaker[Session]]:
    with racing_sessions(4) as factory:
        yield factory


def test_extend_racing_a_full_capture_settles_one_hold(
    session: Session, sessions: sessionmaker[Session]
) -> None:
    # The capture reads the hold again under its update: it takes the extended hold or refuses
    # the extension, never captures the old amount while tokens_reserved holds the new one.
    for round_ in range(20):
        user = f"race{round_}"
        opened(session, user)
        r = reservations.reserve(session, user, amount=30).reservation_id
        session.commit()
        captured, extended = race(
            partial(attempt, sessions, reservations.capture, r),
            partial(attempt, sessions, reservations.extend, r, amount=20),
        )
        assert isinstance(captured, CaptureOut)
        if isinstance(extended, ExtendOut):
            assert captured.amount == -50
        else:
            assert (extended.code, extended.message) == (
                "RESERVATION_NOT_ACTIVE",
                "Reservation is captured",
            )
            assert captured.amount == -30
        b = accounts.get_balance(session, user)
        assert (b.tokens_reserved, b.tokens_balance) == (0, 100 + captured.amount)
    assert_ledger_consistent(session)
