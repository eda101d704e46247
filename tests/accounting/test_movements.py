"""accounting/movements.py over a real PostgreSQL session, races included."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from accounting import accounts, clock, grants, movements, reservations
from accounting.errors import DomainError
from models.schemas import MovementOut
from models.tables import LedgerEntry
from tests.accounting.grant_helpers import (
    credited,
    expiry_entries,
    grant_rows,
    make_due,
    raw_grant,
    split_of,
)
from tests.support import assert_ledger_consistent, attempt, refused, run_in_threads

THREADS = 6  # the engine's pool holds 7 connections; the race needs each thread on its own


def opened(session: Session, user_id: str = "u1", balance: int = 100) -> None:
    accounts.open_account(session, user_id, initial_balance=balance)
    session.commit()


def state(session: Session, user_id: str = "u1") -> tuple[int, int, int, int]:
    """(balance, reserved, spent, ledger entries): what a refusal must leave untouched."""
    b = accounts.get_balance(session, user_id)
    count = session.scalar(select(func.count()).where(LedgerEntry.user_id == user_id))
    return b.tokens_balance, b.tokens_reserved, b.tokens_spent, int(count or 0)


def entry(session: Session, out: MovementOut) -> LedgerEntry:
    found = session.get(LedgerEntry, int(out.ledger_entry_id))
    assert found is not None
    return found


def fails(session: Session, action: Callable[..., Any], *args: Any, **kw: Any) -> tuple[str, str]:
    """The refusal's (code, message), after checking it changed nothing."""
    user_id = args[0]
    before = state(session, user_id)
    err = refused(session, action, *args, **kw)
    assert state(session, user_id) == before
    return err.code, err.message


# --- happy paths ---------------------------------------------------------------------------


def test_debit(session: Session) -> None:
    opened(session)
    out = movements.debit(session, "u1", 30, "image_generation", metadata={"job": "j1"})
    session.commit()
    assert out.model_dump() == {
        "success": True,
        "user_id": "u1",
        "operation_type": "image_generation",
        "amount": -30,
        "balance_before": 100,
        "new_balance": 70,
        "tokens_spent": 30,
        "ledger_entry_id": out.ledger_entry_id,
        "replayed": False,
    }
    e = entry(session, out)
    assert (e.kind, e.operation_type, e.tokens_amount, e.balance_before, e.balance_after) == (
        "debit",
        "image_generation",
        -30,
        100,
        70,
    )
    assert (e.meta, e.idempotency_key, e.original_entry_id) == ({"job": "j1"}, None, None)
    assert state(session) == (70, 0, 30, 2)
    assert_ledger_consistent(session)


def test_credit(session: Session) -> None:
    opened(session)
    movements.debit(session, "u1", 10, "chatgpt_message")
    out = movements.credit(session, "u1", 50)
    session.commit()
    assert (out.operation_type, out.amount, out.balance_before, out.new_balance) == (
        "purchase",
        50,
        90,
        140,
    )
    assert out.tokens_spent == 10  # a credit is not a refund: spending stays
    assert entry(session, out).kind == "credit"
    bonus = movements.credit(session, "u1", 5, operation_type="adjustment", metadata={"why": "x"})
    session.commit()
    assert (bonus.operation_type, bonus.new_balance, entry(session, bonus).meta) == (
        "adjustment",
        145,
        {"why": "x"},
    )
    assert_ledger_consistent(session)


def test_charge_takes_the_listed_price(session: Session) -> None:
    opened(session, balance=20)
    image = movements.charge(session, "u1", "image_generation")
    message = movements.charge(session, "u1", "chatgpt_message")
    session.commit()
    assert (image.amount, image.balance_before, image.new_balance, image.tokens_spent) == (
        -10,
        20,
        10,
        10,
    )
    assert (message.amount, message.new_balance, message.tokens_spent) == (-5, 5, 15)
    assert entry(session, image).kind == "charge"
    assert_ledger_consistent(session)


def test_refund_lowers_spent_but_never_below_zero(session: Session) -> None:
    opened(session)
    movements.debit(session, "u1", 30, "image_generation")
    out = movements.refund(session, "u1", 10, reason="failed job")
    session.commit()
    assert (out.operation_type, out.amount, out.balance_before, out.new_balance) == (
        "refund",
        10,
        70,
        80,
    )
    assert out.tokens_spent == 20
    e = entry(session, out)
    assert (e.kind, e.meta, e.original_entry_id) == ("refund", {"reason": "failed job"}, None)
    goodwill = movements.refund(session, "u1", 50)
    session.commit()
    assert (goodwill.new_balance, goodwill.tokens_spent) == (130, 0)
    assert state(session) == (130, 0, 0, 4)
    assert_ledger_consistent(session)


def test_reset_balance_writes_the_difference(session: Session) -> None:
    opened(session)
    movements.debit(session, "u1", 10, "image_generation")
    down = movements.reset_balance(session, "u1", 25, reason="support")
    session.commit()
    assert down.model_dump() == {
        "success": True,
        "user_id": "u1",
        "operation_type": "adjustment",
        "amount": -65,
        "balance_before": 90,
        "new_balance": 25,
        "tokens_spent": 10,
        "ledger_entry_id": down.ledger_entry_id,
        "replayed": False,
    }
    assert (entry(session, down).kind, entry(session, down).meta) == (
        "adjustment",
        {"reason": "support"},
    )
    up = movements.reset_balance(session, "u1", 500)
    zero = movements.reset_balance(session, "u1", 0)
    session.commit()
    assert (up.amount, up.new_balance, zero.amount, zero.new_balance) == (475, 500, -500, 0)
    assert state(session) == (0, 0, 10, 5)
    assert_ledger_consistent(session)


def test_reset_below_what_reservations_hold_is_refused(session: Session) -> None:
    """The confirmed defect: reserve 80 of 100, reset to 0 (available -80), then capture took
    the balance to -80 with no overdraft asked for."""
    opened(session)
    held = reservations.reserve(session, "u1", 80)
    session.commit()
    assert fails(session, movements.reset_balance, "u1", 0) == (
        "BELOW_RESERVED",
        "Balance cannot go below reserved tokens. Reserved: 80",
    )
    assert fails(session, movements.reset_balance, "u1", 79)[0] == "BELOW_RESERVED"
    at_hold = movements.reset_balance(session, "u1", 80)
    session.commit()
    assert (at_hold.new_balance, accounts.get_balance(session, "u1").tokens_available) == (80, 0)
    captured = reservations.capture(session, held.reservation_id)
    session.commit()
    assert captured.new_balance == 0
    assert_ledger_consistent(session)


def test_overdraft_is_allowed_only_when_asked(session: Session) -> None:
    opened(session, balance=5)
    reservations.reserve(session, "u1", 5)
    session.commit()
    out = movements.debit(session, "u1", 30, "image_generation", allow_overdraft=True)
    session.commit()
    assert (out.balance_before, out.new_balance, out.tokens_spent) == (5, -25, 30)
    assert fails(session, movements.debit, "u1", 1, "image_generation") == (
        "INSUFFICIENT_TOKENS",
        "Insufficient tokens. Required: 1, Available: -30",
    )
    assert_ledger_consistent(session)


# --- refusals --------------------------------------------------------------------------------


def test_insufficient_tokens(session: Session) -> None:
    opened(session, balance=25)
    assert fails(session, movements.debit, "u1", 30, "image_generation") == (
        "INSUFFICIENT_TOKENS",
        "Insufficient tokens. Required: 30, Available: 25",
    )
    movements.debit(session, "u1", 20, "image_generation")
    session.commit()
    assert fails(session, movements.charge, "u1", "image_generation") == (
        "INSUFFICIENT_TOKENS",
        "Insufficient tokens. Required: 10, Available: 5",
    )
    # Exactly the available amount is fine.
    assert movements.debit(session, "u1", 5, "chatgpt_message").new_balance == 0
    session.commit()
    assert_ledger_consistent(session)


def test_reserved_tokens_are_not_available(session: Session) -> None:
    opened(session, balance=100)
    reservations.reserve(session, "u1", 85)
    session.commit()
    assert fails(session, movements.debit, "u1", 20, "image_generation") == (
        "INSUFFICIENT_TOKENS",
        "Insufficient tokens. Required: 20, Available: 15",
    )
    movements.charge(session, "u1", "image_generation")
    session.commit()
    assert fails(session, movements.charge, "u1", "image_generation") == (
        "INSUFFICIENT_TOKENS",
        "Insufficient tokens. Required: 10, Available: 5",
    )
    assert movements.debit(session, "u1", 5, "chatgpt_message").new_balance == 85
    session.commit()
    assert state(session) == (85, 85, 15, 3)
    assert_ledger_consistent(session)


@pytest.mark.parametrize("amount", [0, -5])
def test_amounts_must_be_positive(session: Session, amount: int) -> None:
    opened(session)
    assert fails(session, movements.debit, "u1", amount, "image_generation") == (
        "INVALID_AMOUNT",
        "Debit amount must be positive",
    )
    assert fails(session, movements.credit, "u1", amount) == (
        "INVALID_AMOUNT",
        "Credit amount must be positive",
    )
    assert fails(session, movements.refund, "u1", amount) == (
        "INVALID_AMOUNT",
        "Refund amount must be positive",
    )


def test_reset_below_zero_is_refused(session: Session) -> None:
    opened(session)
    assert fails(session, movements.reset_balance, "u1", -1) == (
        "NEGATIVE_BALANCE",
        "Balance cannot be negative",
    )


@pytest.mark.parametrize("free", ["refund", "purchase", "monthly_reset", "adjustment"])
def test_free_operations_are_not_chargeable(session: Session, free: str) -> None:
    opened(session)
    assert fails(session, movements.charge, "u1", free) == (
        "NOT_CHARGEABLE",
        f"Operation type {free} has no cost",
    )


def test_unknown_operation_type(session: Session) -> None:
    opened(session)
    expected = ("UNKNOWN_OPERATION_TYPE", "Unknown operation type: teleport")
    assert fails(session, movements.debit, "u1", 10, "teleport") == expected
    assert fails(session, movements.credit, "u1", 10, "teleport") == expected
    assert fails(session, movements.charge, "u1", "teleport") == expected


def test_unknown_user(session: Session) -> None:
    expected = ("USER_NOT_FOUND", "User not found")
    cases: list[tuple[Callable[..., MovementOut], tuple[Any, ...]]] = [
        (movements.debit, (10, "image_generation")),
        (movements.debit, (10, "image_generation", True)),  # overdraft: no guard to fail on
        (movements.credit, (10,)),
        (movements.charge, ("image_generation",)),
        (movements.refund, (10,)),
        (movements.reset_balance, (10,)),
    ]
    for action, args in cases:
        err = refused(session, action, "ghost", *args)
        assert (err.code, err.message) == expected, action.__name__
    assert session.scalar(select(func.count()).select_from(LedgerEntry)) == 0


# --- refunds against an original entry -----------------------------------------------------


def test_refund_against_original_entry(session: Session) -> None:
    opened(session)
    charge = movements.debit(session, "u1", 30, "image_generation")
    session.commit()
    first = movements.refund(session, "u1", 20, original_entry_id=charge.ledger_entry_id)
    session.commit()
    assert (first.amount, first.new_balance, first.tokens_spent) == (20, 90, 10)
    assert entry(session, first).original_entry_id == int(charge.ledger_entry_id)
    assert fails(session, movements.refund, "u1", 15, original_entry_id=charge.ledger_entry_id) == (
        "REFUND_EXCEEDS_ORIGINAL",
        "Refund exceeds original charge. Charged: 30, Refunded: 20",
    )
    # Partial refunds may add up to exactly the charge (an int id is accepted too).
    rest = movements.refund(session, "u1", 10, original_entry_id=int(charge.ledger_entry_id))
    session.commit()
    assert (rest.new_balance, rest.tokens_spent) == (100, 0)
    assert fails(session, movements.refund, "u1", 1, original_entry_id=charge.ledger_entry_id) == (
        "REFUND_EXCEEDS_ORIGINAL",
        "Refund exceeds original charge. Charged: 30, Refunded: 30",
    )
    assert_ledger_consistent(session)


def test_one_refund_larger_than_the_charge(session: Session) -> None:
    opened(session)
    charge = movements.charge(session, "u1", "image_generation")
    session.commit()
    assert fails(session, movements.refund, "u1", 11, original_entry_id=charge.ledger_entry_id) == (
        "REFUND_EXCEEDS_ORIGINAL",
        "Refund exceeds original charge. Charged: 10, Refunded: 0",
    )
    assert (
        movements.refund(session, "u1", 10, original_entry_id=charge.ledger_entry_id).amount == 10
    )
    session.commit()


def test_refunds_of_other_entries_do_not_count(session: Session) -> None:
    opened(session)
    a = movements.debit(session, "u1", 10, "image_generation")
    b = movements.debit(session, "u1", 10, "image_generation")
    movements.refund(session, "u1", 10, original_entry_id=a.ledger_entry_id)
    session.commit()
    assert movements.refund(session, "u1", 10, original_entry_id=b.ledger_entry_id).amount == 10
    session.commit()
    assert_ledger_consistent(session)


def test_refund_needs_a_debit_or_charge_of_this_user(session: Session) -> None:
    opened(session)
    opened(session, "u2")
    own_credit = movements.credit(session, "u1", 50)
    others_debit = movements.debit(session, "u2", 30, "image_generation")
    own_debit = movements.debit(session, "u1", 30, "image_generation")
    own_refund = movements.refund(session, "u1", 5, original_entry_id=own_debit.ledger_entry_id)
    session.commit()
    not_found = ("ENTRY_NOT_FOUND", "Original entry not found")
    for original in [
        "999999",  # no such entry
        others_debit.ledger_entry_id,
        own_credit.ledger_entry_id,
        own_refund.ledger_entry_id,
        "abc",
        "12abc",
        "-1",
        " 1",
        "\uff11",  # a full-width 1: str.isdigit() says yes, an id it is not
        "99999999999999999999999",
        2**70,
    ]:
        assert fails(session, movements.refund, "u1", 1, original_entry_id=original) == not_found, (
            original
        )
    assert_ledger_consistent(session)


# --- races: real threads, each with its own session and transaction ---------------------------


def test_concurrent_debits_never_overspend(session: Session) -> None:
    opened(session, balance=1000)
    per_thread = 30  # 180 attempts of 10 on 1000 tokens: exactly 100 can succeed

    def work(_: int) -> list[MovementOut | DomainError]:
        return [attempt(movements.debit, "u1", 10, "image_generation") for _ in range(per_thread)]

    outcomes = [o for batch in run_in_threads(THREADS, work) for o in batch]
    ok = [o for o in outcomes if isinstance(o, MovementOut)]
    refusals = [o for o in outcomes if isinstance(o, DomainError)]
    assert len(ok) == 100
    assert {r.code for r in refusals} == {"INSUFFICIENT_TOKENS"}
    assert sorted(o.new_balance for o in ok) == list(range(0, 1000, 10))
    assert state(session) == (0, 0, 1000, 101)
    assert_ledger_consistent(session)


def test_concurrent_overdraft_debits_lose_no_update(session: Session) -> None:
    # No guard can refuse here, so only the atomic UPDATE keeps every debit.
    opened(session, balance=100)
    per_thread = 25

    def work(_: int) -> list[MovementOut | DomainError]:
        return [
            attempt(movements.debit, "u1", 3, "chatgpt_message", allow_overdraft=True)
            for _ in range(per_thread)
        ]

    outcomes = [o for batch in run_in_threads(THREADS, work) for o in batch]
    assert all(isinstance(o, MovementOut) for o in outcomes)
    total = 3 * THREADS * per_thread
    assert state(session) == (100 - total, 0, total, 1 + THREADS * per_thread)
    assert_ledger_consistent(session)


def refund_40_of(original: str) -> Callable[[int], MovementOut | DomainError]:
    return lambda _: attempt(movements.refund, "u1", 40, original_entry_id=original)


def test_concurrent_refunds_never_exceed_the_original(session: Session) -> None:
    opened(session, balance=1000)
    original = movements.debit(session, "u1", 100, "image_generation").ledger_entry_id
    session.commit()
    rounds = 5  # each round: THREADS refunds of 40 against a fresh charge of 100; 2 fit

    for _ in range(rounds):
        outcomes = run_in_threads(THREADS, refund_40_of(original))
        ok = [o for o in outcomes if isinstance(o, MovementOut)]
        refusals = [o for o in outcomes if isinstance(o, DomainError)]
        assert len(ok) == 2
        assert {r.message for r in refusals} <= {
            "Refund exceeds original charge. Charged: 100, Refunded: 40",
            "Refund exceeds original charge. Charged: 100, Refunded: 80",
        }
        refunded = session.scalar(
            select(func.sum(LedgerEntry.tokens_amount)).where(
                LedgerEntry.original_entry_id == int(original)
            )
        )
        assert refunded == 80
        session.commit()
        original = movements.debit(session, "u1", 100, "image_generation").ledger_entry_id
        session.commit()
    assert_ledger_consistent(session)


# --- refunds into grants (contract v1.1) -------------------------------------------------------


def test_refunds_go_back_into_the_grants_spent_last_spent_first(session: Session) -> None:
    opened(session, balance=0)
    promo = credited(session, 10, kind="promo")  # spent first
    ending = credited(session, 10, expires_at=clock.db_now(session) + timedelta(days=1))
    rest = credited(session, 100)
    debit = movements.debit(session, "u1", 30, "image_generation")
    session.commit()
    assert split_of(session, debit.ledger_entry_id) == [(promo, -10), (ending, -10), (rest, -10)]
    refunds = [
        movements.refund(session, "u1", n, original_entry_id=debit.ledger_entry_id)
        for n in (5, 10, 15)
    ]
    session.commit()
    assert [split_of(session, r.ledger_entry_id) for r in refunds] == [
        [(rest, 5)],
        [(rest, 5), (ending, 5)],
        [(ending, 5), (promo, 10)],
    ]
    rows = grant_rows(session)
    assert [(rows[g].remaining, rows[g].status) for g in (promo, ending, rest)] == [
        (10, "active"),
        (10, "active"),
        (100, "active"),
    ]
    assert_ledger_consistent(session)


def test_a_refund_into_an_ended_grant_expires_again_at_once(session: Session) -> None:
    opened(session, balance=0)
    ending = credited(
        session, 30, priority=10, expires_at=clock.db_now(session) + timedelta(days=1)
    )
    credited(session, 100)
    debit = movements.debit(session, "u1", 20, "image_generation")
    session.commit()
    make_due(session, ending)
    refund = movements.refund(session, "u1", 15, original_entry_id=debit.ledger_entry_id)
    session.commit()
    assert split_of(session, refund.ledger_entry_id) == [(ending, 15)]
    # The 10 left expired before the refund; the 15 put back leave in the same transaction.
    assert expiry_entries(session, ending) == [-10, -15]
    last = session.execute(
        text("SELECT kind, tokens_amount, created_at FROM ledger_entries ORDER BY id DESC LIMIT 2")
    ).all()
    assert [(k, a) for k, a, _ in last] == [("expiry", -15), ("refund", 15)]
    assert last[0].created_at == last[1].created_at  # one transaction, one time
    g = raw_grant(session, ending)
    assert (g.remaining, g.returned, g.expired, g.status) == (0, 15, 25, "expired")
    b = accounts.get_balance(session, "u1")
    assert (b.tokens_balance, b.tokens_spent, b.by_kind) == (100, 5, {"purchased": 100})
    assert_ledger_consistent(session)


def test_a_refund_of_an_overdraft_debit_pays_the_debt_first(session: Session) -> None:
    opened(session, balance=10)
    (grant,) = grants.list_grants(session, "u1").grants
    debit = movements.debit(session, "u1", 30, "image_generation", allow_overdraft=True)
    session.commit()
    assert grants.list_grants(session, "u1").debt == 20
    first = movements.refund(session, "u1", 15, original_entry_id=debit.ledger_entry_id)
    session.commit()
    assert split_of(session, first.ledger_entry_id) == []  # the debt part came back first
    assert (first.new_balance, grants.list_grants(session, "u1").debt) == (-5, 5)
    second = movements.refund(session, "u1", 10, original_entry_id=debit.ledger_entry_id)
    session.commit()
    assert split_of(session, second.ledger_entry_id) == [(grant.grant_id, 5)]
    b = accounts.get_balance(session, "u1")
    assert (b.tokens_balance, b.debt, b.by_kind) == (5, 0, {"adjustment": 5})
    assert_ledger_consistent(session)
