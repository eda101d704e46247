"""accounting/clock.py: every timestamp comes from the database, so a worker whose clock is off
cannot reorder a user's ledger, reset a refund cap or bend an expiry."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from accounting import accounts, clock, ledger, movements, reservations
from models.tables import Account, IdempotencyRecord, LedgerEntry, Reservation
from tests.support import assert_ledger_consistent, refused

SKEW = timedelta(seconds=120)


def lag_worker_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on this process's wall clock, as the project reads it, runs ``SKEW`` behind:
    what a second worker on a badly synchronised host sees. The database's clock is untouched."""

    def behind() -> datetime:
        return datetime.now(UTC) - SKEW

    for name, module in list(sys.modules.items()):
        if name.startswith(("accounting", "models", "tasks", "worker")):
            monkeypatch.setattr(module, "utcnow", behind, raising=False)


@pytest.fixture
def worker_clock_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    lag_worker_clock(monkeypatch)
    yield


def db_time(session: Session) -> datetime:
    return clock.db_now(session)


def entries_in_contract_order(session: Session, user_id: str) -> list[LedgerEntry]:
    return list(
        session.scalars(
            select(LedgerEntry)
            .where(LedgerEntry.user_id == user_id)
            .order_by(LedgerEntry.created_at, LedgerEntry.id)
        )
    )


def test_db_now_is_the_database_clock(session: Session) -> None:
    server = session.execute(text("SELECT clock_timestamp()")).scalar_one()
    assert abs(db_time(session) - server) < timedelta(seconds=1)
    assert db_time(session).tzinfo is not None


def test_a_lagging_worker_clock_cannot_reorder_a_users_entries(
    session: Session, worker_clock_behind: None
) -> None:
    accounts.open_account(session, "u1", initial_balance=100)
    session.commit()
    start = db_time(session)
    debit = movements.debit(session, "u1", 30, "image_generation")
    credit = movements.credit(session, "u1", 5)
    charge = movements.charge(session, "u1", "chatgpt_message")
    session.commit()
    ordered = entries_in_contract_order(session, "u1")
    assert [str(e.id) for e in ordered[1:]] == [
        debit.ledger_entry_id,
        credit.ledger_entry_id,
        charge.ledger_entry_id,
    ]
    # Written now by the database's clock, not two minutes ago by the worker's.
    assert all(e.created_at >= start - timedelta(seconds=1) for e in ordered)
    assert_ledger_consistent(session)


def test_entries_follow_the_order_applied_even_if_the_server_clock_stepped_back(
    session: Session,
) -> None:
    accounts.open_account(session, "u1", initial_balance=100)
    session.commit()
    # The account's last change claims to be an hour ahead (a clock that stepped back since):
    # the next entry is stamped no earlier than that, so created_at order stays applied order.
    ahead = db_time(session) + timedelta(hours=1)
    session.execute(text("UPDATE accounts SET updated_at = :t"), {"t": ahead})
    session.execute(text("UPDATE ledger_entries SET created_at = :t"), {"t": ahead})
    session.commit()
    out = movements.debit(session, "u1", 10, "image_generation")
    session.commit()
    ordered = entries_in_contract_order(session, "u1")
    assert str(ordered[-1].id) == out.ledger_entry_id
    assert ordered[-1].created_at >= ahead
    assert_ledger_consistent(session)


def test_a_refund_written_by_a_lagging_worker_cannot_be_pruned_before_its_debit(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The confirmed defect: with the refund stamped by a clock 120 s behind the debit's
    worker, pruning at the debit's time removed the refund, kept the debit, and a second full
    refund went through."""
    accounts.open_account(session, "u1", initial_balance=100)
    debit = movements.debit(session, "u1", 50, "image_generation")
    session.commit()
    lag_worker_clock(monkeypatch)  # the refund comes from the other worker
    movements.refund(session, "u1", 50, original_entry_id=debit.ledger_entry_id)
    session.commit()
    debit_time = session.get_one(LedgerEntry, int(debit.ledger_entry_id)).created_at
    ledger.delete_old_entries(session, debit_time)
    session.commit()
    err = refused(session, movements.refund, "u1", 50, original_entry_id=debit.ledger_entry_id)
    assert (err.code, err.message) == (
        "REFUND_EXCEEDS_ORIGINAL",
        "Refund exceeds original charge. Charged: 50, Refunded: 50",
    )
    assert accounts.get_balance(session, "u1").tokens_balance == 100
    assert ledger.reconcile(session).mismatches == []


def test_the_refund_cap_survives_pruning_of_the_refund_entries(session: Session) -> None:
    """Even where old data has a refund stamped before its debit (written by the clocks of
    earlier versions), pruning that refund does not let the debit be refunded again."""
    accounts.open_account(session, "u1", initial_balance=100)
    debit = movements.debit(session, "u1", 50, "image_generation")
    session.commit()
    first = movements.refund(session, "u1", 30, original_entry_id=debit.ledger_entry_id)
    session.commit()
    debit_time = session.get_one(LedgerEntry, int(debit.ledger_entry_id)).created_at
    session.execute(
        text("UPDATE ledger_entries SET created_at = :t WHERE id = :id"),
        {"t": debit_time - SKEW, "id": int(first.ledger_entry_id)},
    )
    session.commit()
    ledger.delete_old_entries(session, debit_time)
    session.commit()
    assert session.get(LedgerEntry, int(first.ledger_entry_id)) is None  # pruned
    err = refused(session, movements.refund, "u1", 21, original_entry_id=debit.ledger_entry_id)
    assert (err.code, err.message) == (
        "REFUND_EXCEEDS_ORIGINAL",
        "Refund exceeds original charge. Charged: 50, Refunded: 30",
    )
    assert movements.refund(session, "u1", 20, original_entry_id=debit.ledger_entry_id).amount == 20
    session.commit()
    assert ledger.reconcile(session).mismatches == []


def test_reservation_times_come_from_the_database(
    session: Session, worker_clock_behind: None
) -> None:
    accounts.open_account(session, "u1", initial_balance=100)
    session.commit()
    start = db_time(session)
    held = reservations.reserve(session, "u1", 10, ttl_seconds=60)
    session.commit()
    row = session.get_one(Reservation, held.reservation_id)
    assert row.created_at >= start - timedelta(seconds=1)
    assert held.expires_at == row.created_at + timedelta(seconds=60)
    # A lagging worker must not think the reservation still has two more minutes.
    session.execute(
        text("UPDATE reservations SET expires_at = clock_timestamp() - interval '1 second'")
    )
    session.commit()
    err = refused(session, reservations.capture, held.reservation_id)
    assert (err.code, err.message) == ("RESERVATION_NOT_ACTIVE", "Reservation is expired")
    assert reservations.expire_batch(session) == 1
    session.commit()
    assert accounts.get_balance(session, "u1").tokens_reserved == 0


def test_account_and_idempotency_times_come_from_the_database(
    session: Session, worker_clock_behind: None
) -> None:
    start = db_time(session)
    accounts.open_account(session, "u1", initial_balance=10)
    movements.credit(session, "u1", 5, idempotency_key="k1")
    accounts.set_tier(session, "u1", "Professional")
    session.commit()
    account = session.get_one(Account, "u1")
    record = session.get_one(IdempotencyRecord, ("u1", "k1"))
    for stamped in (account.created_at, account.updated_at, record.created_at):
        assert stamped >= start - timedelta(seconds=1), stamped
