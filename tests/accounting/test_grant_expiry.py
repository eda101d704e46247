"""Grant expiry (contract v1.1): what reservations hold waits for them, and expiry racing
debits, captures and refunds spends and expires each token once."""

from __future__ import annotations

from datetime import timedelta
from functools import partial

from sqlalchemy.orm import Session

from accounting import accounts, clock, grants, movements, reservations
from accounting.errors import DomainError
from models.schemas import CaptureOut, MovementOut
from tests.accounting.grant_helpers import (
    attempt,
    credited,
    expiry_entries,
    make_due,
    opened,
    race,
    racing_sessions,
    raw_grant,
    split_of,
)
from tests.support import assert_ledger_consistent
from worker.db import session_factory


def ending_grant(session: Session, amount: int, user_id: str = "u1") -> str:
    """An allowance-like grant spent first (priority 10) that ends in a day."""
    ends = clock.db_now(session) + timedelta(days=1)
    return credited(session, amount, user_id, priority=10, expires_at=ends)


def test_expiry_skips_what_a_reservation_holds(session: Session) -> None:
    opened(session)
    ending = ending_grant(session, 50)
    credited(session, 100)
    reservations.reserve(session, "u1", amount=20)  # held of the ending grant
    session.commit()
    make_due(session, ending)
    b = accounts.get_balance(session, "u1")  # a read expires what is due first
    assert (b.tokens_balance, b.tokens_reserved, b.tokens_available) == (120, 20, 100)
    assert expiry_entries(session, ending) == [-30]
    g = raw_grant(session, ending)
    assert (g.remaining, g.held, g.expired, g.status) == (20, 20, 30, "active")
    assert_ledger_consistent(session)


def test_capture_spends_held_tokens_of_a_grant_that_ended_and_the_rest_expires(
    session: Session,
) -> None:
    opened(session)
    ending = ending_grant(session, 50)
    rest = credited(session, 100)
    r = reservations.reserve(session, "u1", amount=30)
    session.commit()
    make_due(session, ending)
    out = reservations.capture(session, r.reservation_id, amount=25)
    session.commit()
    assert split_of(session, out.ledger_entry_id) == [(ending, -25)]
    # 20 unheld expired before the capture, the 5 it freed right after it.
    assert expiry_entries(session, ending) == [-20, -5]
    g = raw_grant(session, ending)
    assert (g.remaining, g.held, g.spent, g.expired, g.status) == (0, 0, 25, 25, "expired")
    assert accounts.get_balance(session, "u1").tokens_balance == 100
    assert raw_grant(session, rest).remaining == 100
    assert_ledger_consistent(session)


def test_release_lets_held_tokens_of_an_ended_grant_expire(session: Session) -> None:
    opened(session)
    ending = ending_grant(session, 50)
    r = reservations.reserve(session, "u1", amount=50)
    session.commit()
    make_due(session, ending)
    assert accounts.get_balance(session, "u1").tokens_balance == 50  # all held: nothing left
    assert expiry_entries(session, ending) == []
    reservations.release(session, r.reservation_id)
    session.commit()
    assert expiry_entries(session, ending) == [-50]
    assert raw_grant(session, ending).status == "expired"
    assert accounts.get_balance(session, "u1").tokens_balance == 0
    assert_ledger_consistent(session)


def test_reservation_expiry_lets_held_tokens_expire_at_the_next_read(session: Session) -> None:
    opened(session)
    ending = ending_grant(session, 50)
    credited(session, 10)
    reservations.reserve(session, "u1", amount=40, ttl_seconds=60)
    session.commit()
    make_due(session, ending)
    later = clock.db_now(session) + timedelta(minutes=5)
    assert reservations.expire_all(session_factory(), now=later) == 1
    g = raw_grant(session, ending)
    # Freed, not yet written off: the 10 never held, and the 40 the reservation held.
    assert (g.remaining, g.held, g.status) == (50, 0, "active")
    assert_ledger_consistent(session)
    b = accounts.get_balance(session, "u1")
    assert (b.tokens_balance, b.tokens_reserved) == (10, 0)
    assert expiry_entries(session, ending) == [-50]
    assert raw_grant(session, ending).status == "expired"
    assert_ledger_consistent(session)


def test_expiry_racing_debits_captures_refunds_and_reads_spends_and_expires_once(
    session: Session,
) -> None:
    # A grant of 50 that is due: 20 spent by an earlier debit (refunded now, into the ended
    # grant), 20 held by a reservation (captured now), 10 free (expire). Whoever locks first
    # writes the expiry; none may spend it, or expire it, again.
    rounds = 10
    with racing_sessions(5) as sessions:
        for n in range(rounds):
            user = f"race{n}"
            opened(session, user)
            ending = ending_grant(session, 50, user)
            rest = credited(session, 100, user)
            debit = movements.debit(session, user, 20, "image_generation")
            r = reservations.reserve(session, user, amount=20)
            session.commit()
            make_due(session, ending)
            outcomes = race(
                partial(attempt, sessions, movements.debit, user, 5, "chatgpt_message"),
                partial(attempt, sessions, reservations.capture, r.reservation_id),
                partial(
                    attempt,
                    sessions,
                    movements.refund,
                    user,
                    10,
                    original_entry_id=debit.ledger_entry_id,
                ),
                partial(attempt, sessions, accounts.get_balance, user),
                partial(attempt, sessions, grants.list_grants, user),
            )
            debited, captured, refunded, *reads = outcomes
            assert isinstance(debited, MovementOut)
            assert isinstance(captured, CaptureOut)
            assert isinstance(refunded, MovementOut)
            assert not any(isinstance(o, DomainError) for o in reads)
            assert split_of(session, debited.ledger_entry_id) == [(rest, -5)]
            assert split_of(session, captured.ledger_entry_id) == [(ending, -20)]
            assert split_of(session, refunded.ledger_entry_id) == [(ending, 10)]
            # 10 free at the end, then the 10 refunded into the ended grant: once each.
            assert expiry_entries(session, ending) == [-10, -10]
            g = raw_grant(session, ending)
            assert (g.remaining, g.held, g.spent, g.expired, g.returned) == (0, 0, 40, 20, 10)
            # Ended either way: by its expiry, or by the capture taking its last held tokens.
            assert g.status in ("expired", "depleted")
            b = accounts.get_balance(session, user)
            assert (b.tokens_balance, b.tokens_reserved, b.debt) == (95, 0, 0)
    assert_ledger_consistent(session)
