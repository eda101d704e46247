"""tokens.debit, credit, charge, refund, reset_balance (and the debit_batch extension) through
real workers."""

from __future__ import annotations

import uuid
from itertools import pairwise
from typing import Any

import pytest
from celery import Celery

from tests import dbstate
from tests.dbstate import MOVEMENT_KEYS
from tests.support import call

NOT_FOUND = {"success": False, "error": "User not found", "error_code": "USER_NOT_FOUND"}


def refusal(code: str, error: str) -> dict[str, Any]:
    return {"success": False, "error": error, "error_code": code}


def open_account(app: Celery, user_id: str = "u", balance: int = 100) -> None:
    assert call(app, "tokens.open_account", user_id=user_id, initial_balance=balance)["created"]


def assert_recorded(out: dict[str, Any]) -> dict[str, Any]:
    """The movement wrote exactly one new entry matching its result; returns that entry."""
    assert set(out) == MOVEMENT_KEYS
    assert isinstance(out["ledger_entry_id"], str)
    entry = dbstate.entries(out["user_id"])[-1]
    assert str(entry["id"]) == out["ledger_entry_id"]
    assert entry["operation_type"] == out["operation_type"]
    assert entry["tokens_amount"] == out["amount"]
    assert (entry["balance_before"], entry["balance_after"]) == (
        out["balance_before"],
        out["new_balance"],
    )
    account = dbstate.account(out["user_id"])
    assert account is not None
    assert account["tokens_balance"] == out["new_balance"]
    assert account["tokens_spent"] == out["tokens_spent"]
    return entry


def assert_unchanged(
    app: Celery, name: str, kwargs: dict[str, Any], expected: dict[str, Any]
) -> None:
    before = dbstate.snapshot()
    result = app.send_task(name, kwargs=kwargs)
    assert result.get(timeout=30) == expected
    assert result.state == "SUCCESS"
    assert dbstate.snapshot() == before


# --- debit ----------------------------------------------------------------------------------


def test_debit(e2e: Celery) -> None:
    open_account(e2e)
    out = call(
        e2e,
        "tokens.debit",
        user_id="u",
        amount=30,
        operation_type="image_generation",
        metadata={"job": "j-1", "nested": {"n": [1, 2]}},
    )
    assert out == {
        "success": True,
        "user_id": "u",
        "operation_type": "image_generation",
        "amount": -30,
        "balance_before": 100,
        "new_balance": 70,
        "tokens_spent": 30,
        "ledger_entry_id": out["ledger_entry_id"],
        "replayed": False,
    }
    entry = assert_recorded(out)
    assert entry["metadata"] == {"job": "j-1", "nested": {"n": [1, 2]}}
    assert len(dbstate.entries("u")) == 2


def test_debit_of_everything_available_reaches_zero(e2e: Celery) -> None:
    open_account(e2e, balance=10)
    out = call(e2e, "tokens.debit", user_id="u", amount=10, operation_type="sora_image")
    assert out["new_balance"] == 0
    assert_recorded(out)


def test_debit_beyond_available_is_refused(e2e: Celery) -> None:
    open_account(e2e, balance=40)
    kwargs = {"user_id": "u", "amount": 50, "operation_type": "image_generation"}
    expected = refusal("INSUFFICIENT_TOKENS", "Insufficient tokens. Required: 50, Available: 40")
    assert_unchanged(e2e, "tokens.debit", kwargs, expected)


def test_reserved_tokens_are_not_available_to_a_debit(e2e: Celery) -> None:
    open_account(e2e, balance=100)
    dbstate.execute("UPDATE accounts SET tokens_reserved = 80 WHERE user_id = 'u'")
    kwargs = {"user_id": "u", "amount": 30, "operation_type": "image_generation"}
    expected = refusal("INSUFFICIENT_TOKENS", "Insufficient tokens. Required: 30, Available: 20")
    assert_unchanged(e2e, "tokens.debit", kwargs, expected)


def test_debit_with_overdraft_may_go_negative(e2e: Celery) -> None:
    open_account(e2e, balance=5)
    out = call(
        e2e,
        "tokens.debit",
        user_id="u",
        amount=12,
        operation_type="image_generation",
        allow_overdraft=True,
    )
    assert (out["success"], out["new_balance"], out["tokens_spent"]) == (True, -7, 12)
    assert_recorded(out)


@pytest.mark.parametrize("amount", [0, -5, -(10**12)])
def test_debit_of_non_positive_amount(e2e: Celery, amount: int) -> None:
    open_account(e2e)
    kwargs = {"user_id": "u", "amount": amount, "operation_type": "image_generation"}
    expected = refusal("INVALID_AMOUNT", "Debit amount must be positive")
    assert_unchanged(e2e, "tokens.debit", kwargs, expected)


def test_debit_refusals(e2e: Celery) -> None:
    open_account(e2e)
    kwargs = {"user_id": "u", "amount": 5, "operation_type": "teleport"}
    expected = refusal("UNKNOWN_OPERATION_TYPE", "Unknown operation type: teleport")
    assert_unchanged(e2e, "tokens.debit", kwargs, expected)
    kwargs = {"user_id": "ghost", "amount": 5, "operation_type": "image_generation"}
    assert_unchanged(e2e, "tokens.debit", kwargs, NOT_FOUND)


def test_idempotency_key_is_scoped_per_user(e2e: Celery) -> None:
    open_account(e2e, "a")
    open_account(e2e, "b")
    base = {"amount": 10, "operation_type": "image_generation", "idempotency_key": "k"}
    first_a = call(e2e, "tokens.debit", user_id="a", **base)
    first_b = call(e2e, "tokens.debit", user_id="b", **base)
    again_a = call(e2e, "tokens.debit", user_id="a", **base)
    assert not first_a["replayed"] and not first_b["replayed"]
    assert again_a == {**first_a, "replayed": True}
    assert (dbstate.balance("a"), dbstate.balance("b")) == (90, 90)


# --- credit ---------------------------------------------------------------------------------


def test_credit_defaults_to_purchase(e2e: Celery) -> None:
    open_account(e2e, balance=10)
    call(e2e, "tokens.debit", user_id="u", amount=4, operation_type="chatgpt_message")
    out = call(e2e, "tokens.credit", user_id="u", amount=50, metadata={"order": 7})
    assert out == {
        "success": True,
        "user_id": "u",
        "operation_type": "purchase",
        "amount": 50,
        "balance_before": 6,
        "new_balance": 56,
        "tokens_spent": 4,  # a credit is not a refund: spending stays as it was
        "ledger_entry_id": out["ledger_entry_id"],
        "replayed": False,
    }
    assert assert_recorded(out)["metadata"] == {"order": 7}


def test_credit_with_operation_type(e2e: Celery) -> None:
    open_account(e2e, balance=0)
    out = call(e2e, "tokens.credit", user_id="u", amount=3, operation_type="adjustment")
    assert (out["operation_type"], out["new_balance"]) == ("adjustment", 3)
    assert_recorded(out)


def test_credit_refusals(e2e: Celery) -> None:
    open_account(e2e)
    for amount in (0, -1):
        expected = refusal("INVALID_AMOUNT", "Credit amount must be positive")
        assert_unchanged(e2e, "tokens.credit", {"user_id": "u", "amount": amount}, expected)
    expected = refusal("UNKNOWN_OPERATION_TYPE", "Unknown operation type: gift_card")
    kwargs = {"user_id": "u", "amount": 5, "operation_type": "gift_card"}
    assert_unchanged(e2e, "tokens.credit", kwargs, expected)
    assert_unchanged(e2e, "tokens.credit", {"user_id": "ghost", "amount": 5}, NOT_FOUND)


def test_credit_key_reused_for_another_amount(e2e: Celery) -> None:
    open_account(e2e)
    first = call(e2e, "tokens.credit", user_id="u", amount=5, idempotency_key="pay-1")
    assert first["success"]
    expected = refusal("IDEMPOTENCY_CONFLICT", "Idempotency key reused with different parameters")
    kwargs = {"user_id": "u", "amount": 6, "idempotency_key": "pay-1"}
    assert_unchanged(e2e, "tokens.credit", kwargs, expected)
    replay = call(e2e, "tokens.credit", user_id="u", amount=5, idempotency_key="pay-1")
    assert replay == {**first, "replayed": True}
    assert dbstate.balance("u") == 105


# --- charge ---------------------------------------------------------------------------------


def test_charge_takes_the_listed_price(e2e: Celery) -> None:
    open_account(e2e, balance=20)
    out = call(e2e, "tokens.charge", user_id="u", operation_type="chatgpt_message")
    assert out == {
        "success": True,
        "user_id": "u",
        "operation_type": "chatgpt_message",
        "amount": -5,
        "balance_before": 20,
        "new_balance": 15,
        "tokens_spent": 5,
        "ledger_entry_id": out["ledger_entry_id"],
        "replayed": False,
    }
    assert_recorded(out)
    out = call(e2e, "tokens.charge", user_id="u", operation_type="product_card", metadata={"x": 1})
    assert (out["amount"], out["new_balance"], out["tokens_spent"]) == (-10, 5, 15)
    assert assert_recorded(out)["metadata"] == {"x": 1}


def test_charge_refusals(e2e: Celery) -> None:
    open_account(e2e, balance=5)
    cases = [
        (
            {"operation_type": "image_generation"},
            refusal("INSUFFICIENT_TOKENS", "Insufficient tokens. Required: 10, Available: 5"),
        ),
        (
            {"operation_type": "refund"},
            refusal("NOT_CHARGEABLE", "Operation type refund has no cost"),
        ),
        (
            {"operation_type": "purchase"},
            refusal("NOT_CHARGEABLE", "Operation type purchase has no cost"),
        ),
        (
            {"operation_type": "warp"},
            refusal("UNKNOWN_OPERATION_TYPE", "Unknown operation type: warp"),
        ),
    ]
    for kwargs, expected in cases:
        assert_unchanged(e2e, "tokens.charge", {"user_id": "u", **kwargs}, expected)
    kwargs = {"user_id": "ghost", "operation_type": "chatgpt_message"}
    assert_unchanged(e2e, "tokens.charge", kwargs, NOT_FOUND)


def test_charge_replay_with_key(e2e: Celery) -> None:
    open_account(e2e)
    kwargs = {"user_id": "u", "operation_type": "sora_image", "idempotency_key": "gen-1"}
    first = call(e2e, "tokens.charge", **kwargs)
    assert call(e2e, "tokens.charge", **kwargs) == {**first, "replayed": True}
    assert dbstate.balance("u") == 90
    assert len(dbstate.entries("u")) == 2


# --- refund ---------------------------------------------------------------------------------


def test_refund_without_original(e2e: Celery) -> None:
    open_account(e2e)
    call(e2e, "tokens.debit", user_id="u", amount=30, operation_type="image_generation")
    out = call(e2e, "tokens.refund", user_id="u", amount=10, reason="bad output")
    assert out == {
        "success": True,
        "user_id": "u",
        "operation_type": "refund",
        "amount": 10,
        "balance_before": 70,
        "new_balance": 80,
        "tokens_spent": 20,
        "ledger_entry_id": out["ledger_entry_id"],
        "replayed": False,
    }
    entry = assert_recorded(out)
    assert entry["metadata"]["reason"] == "bad output"
    assert entry["original_entry_id"] is None


def test_tokens_spent_never_falls_below_zero(e2e: Celery) -> None:
    open_account(e2e)
    call(e2e, "tokens.debit", user_id="u", amount=5, operation_type="chatgpt_message")
    out = call(e2e, "tokens.refund", user_id="u", amount=20)
    assert (out["new_balance"], out["tokens_spent"]) == (115, 0)
    assert_recorded(out)


def test_partial_refunds_never_exceed_what_the_entry_charged(e2e: Celery) -> None:
    open_account(e2e)
    debit = call(e2e, "tokens.debit", user_id="u", amount=10, operation_type="image_generation")
    original = debit["ledger_entry_id"]
    first = call(e2e, "tokens.refund", user_id="u", amount=6, original_entry_id=original)
    assert first["success"]
    entry = assert_recorded(first)
    assert str(entry["original_entry_id"]) == original
    expected = refusal(
        "REFUND_EXCEEDS_ORIGINAL", "Refund exceeds original charge. Charged: 10, Refunded: 6"
    )
    kwargs = {"user_id": "u", "amount": 5, "original_entry_id": original}
    assert_unchanged(e2e, "tokens.refund", kwargs, expected)
    # The integer id a producer may hold works as well; the rest fits exactly.
    rest = call(e2e, "tokens.refund", user_id="u", amount=4, original_entry_id=int(original))
    assert (rest["success"], rest["new_balance"]) == (True, 100)
    expected = refusal(
        "REFUND_EXCEEDS_ORIGINAL", "Refund exceeds original charge. Charged: 10, Refunded: 10"
    )
    kwargs = {"user_id": "u", "amount": 1, "original_entry_id": original}
    assert_unchanged(e2e, "tokens.refund", kwargs, expected)


def test_refund_against_a_charge(e2e: Celery) -> None:
    open_account(e2e)
    charge = call(e2e, "tokens.charge", user_id="u", operation_type="chatgpt_message")
    out = call(
        e2e, "tokens.refund", user_id="u", amount=5, original_entry_id=charge["ledger_entry_id"]
    )
    assert (out["success"], out["new_balance"], out["tokens_spent"]) == (True, 100, 0)


def test_refund_against_entries_that_are_not_refundable(e2e: Celery) -> None:
    open_account(e2e, "u")
    open_account(e2e, "other")
    credit = call(e2e, "tokens.credit", user_id="u", amount=50)
    theirs = call(e2e, "tokens.debit", user_id="other", amount=10, operation_type="sora_image")
    expected = refusal("ENTRY_NOT_FOUND", "Original entry not found")
    for original in (credit["ledger_entry_id"], theirs["ledger_entry_id"], "999999", "abc", 999):
        kwargs = {"user_id": "u", "amount": 1, "original_entry_id": original}
        assert_unchanged(e2e, "tokens.refund", kwargs, expected)


def test_refund_refusals(e2e: Celery) -> None:
    open_account(e2e)
    for amount in (0, -3):
        expected = refusal("INVALID_AMOUNT", "Refund amount must be positive")
        assert_unchanged(e2e, "tokens.refund", {"user_id": "u", "amount": amount}, expected)
    assert_unchanged(e2e, "tokens.refund", {"user_id": "ghost", "amount": 5}, NOT_FOUND)


# --- reset_balance --------------------------------------------------------------------------


def test_reset_balance_writes_the_difference_as_adjustment(e2e: Celery) -> None:
    open_account(e2e, balance=100)
    call(e2e, "tokens.debit", user_id="u", amount=10, operation_type="image_generation")
    down = call(e2e, "tokens.reset_balance", user_id="u", new_balance=25, reason="support")
    assert down == {
        "success": True,
        "user_id": "u",
        "operation_type": "adjustment",
        "amount": -65,
        "balance_before": 90,
        "new_balance": 25,
        "tokens_spent": 10,
        "ledger_entry_id": down["ledger_entry_id"],
        "replayed": False,
    }
    assert assert_recorded(down)["metadata"]["reason"] == "support"
    up = call(e2e, "tokens.reset_balance", user_id="u", new_balance=1000)
    assert (up["amount"], up["new_balance"]) == (975, 1000)
    assert_recorded(up)
    zero = call(e2e, "tokens.reset_balance", user_id="u", new_balance=0)
    assert (zero["amount"], zero["new_balance"]) == (-1000, 0)


def test_reset_balance_refusals(e2e: Celery) -> None:
    open_account(e2e)
    expected = refusal("NEGATIVE_BALANCE", "Balance cannot be negative")
    assert_unchanged(e2e, "tokens.reset_balance", {"user_id": "u", "new_balance": -1}, expected)
    kwargs = {"user_id": "ghost", "new_balance": 5}
    assert_unchanged(e2e, "tokens.reset_balance", kwargs, NOT_FOUND)
    # Under what reservations hold: a later capture would overdraw without any overdraft asked.
    held = call(e2e, "tokens.reserve", user_id="u", amount=80)
    assert held["success"], held
    expected = refusal("BELOW_RESERVED", "Balance cannot go below reserved tokens. Reserved: 80")
    assert_unchanged(e2e, "tokens.reset_balance", {"user_id": "u", "new_balance": 0}, expected)
    assert_unchanged(e2e, "tokens.reset_balance", {"user_id": "u", "new_balance": 79}, expected)
    at_hold = call(e2e, "tokens.reset_balance", user_id="u", new_balance=80)
    assert at_hold["new_balance"] == 80
    assert call(e2e, "tokens.capture", reservation_id=held["reservation_id"])["new_balance"] == 0


def test_every_movement_keeps_balance_equal_to_ledger(e2e: Celery) -> None:
    open_account(e2e)
    debit = call(e2e, "tokens.debit", user_id="u", amount=30, operation_type="image_generation")
    call(e2e, "tokens.charge", user_id="u", operation_type="chatgpt_message")
    call(e2e, "tokens.credit", user_id="u", amount=12)
    call(e2e, "tokens.refund", user_id="u", amount=7, original_entry_id=debit["ledger_entry_id"])
    call(e2e, "tokens.reset_balance", user_id="u", new_balance=3)
    rows = dbstate.entries("u")
    assert len(rows) == 6
    assert sum(r["tokens_amount"] for r in rows) == dbstate.balance("u") == 3
    for prev, row in pairwise(rows):
        assert row["balance_before"] == prev["balance_after"]
    assert call(e2e, "ledger.reconcile", user_id="u") == {
        "success": True,
        "checked": 1,
        "mismatches": [],
    }


# --- debit_batch (an extension beside the contract) ----------------------------------------


def item(user_id: str, amount: int, **kw: Any) -> dict[str, Any]:
    return {"user_id": user_id, "amount": amount, "operation_type": "image_generation", **kw}


def test_debit_batch(e2e: Celery) -> None:
    open_account(e2e, "a", 100)
    open_account(e2e, "b", 10)
    debits = [item("b", 5), item("a", 200), item("ghost", 1), item("a", 30), item("b", 6)]
    out = call(e2e, "tokens.debit_batch", debits=debits)
    assert set(out) == {"success", "results", "applied", "refused"}
    assert (out["success"], out["applied"], out["refused"]) == (True, 2, 3)
    r = out["results"]
    assert [x["success"] for x in r] == [True, False, False, True, False]
    assert (r[0]["user_id"], r[0]["new_balance"]) == ("b", 5)
    assert (r[3]["user_id"], r[3]["new_balance"]) == ("a", 70)
    for movement in (r[0], r[3]):
        assert_recorded(movement)
        assert movement["replayed"] is False
    assert r[1] == refusal(
        "INSUFFICIENT_TOKENS", "Insufficient tokens. Required: 200, Available: 100"
    )
    assert r[2] == NOT_FOUND
    assert r[4] == refusal("INSUFFICIENT_TOKENS", "Insufficient tokens. Required: 6, Available: 5")
    assert call(e2e, "ledger.reconcile")["mismatches"] == []


def test_a_redelivered_debit_batch_applies_once(e2e: Celery) -> None:
    open_account(e2e, "a", 100)
    open_account(e2e, "b", 100)
    debits = [item("a", 10), item("b", 20), item("a", 30, idempotency_key="own")]
    task_id = str(uuid.uuid4())
    first = e2e.send_task("tokens.debit_batch", kwargs={"debits": debits}, task_id=task_id)
    first_out = first.get(timeout=30)
    before = dbstate.snapshot()
    e2e.backend.forget(task_id)
    second = e2e.send_task("tokens.debit_batch", kwargs={"debits": debits}, task_id=task_id)
    assert second.get(timeout=30) == {
        **first_out,
        "results": [{**r, "replayed": True} for r in first_out["results"]],
    }
    assert dbstate.snapshot() == before
    assert [e["idempotency_key"] for e in dbstate.entries("a")[-2:]] == [f"{task_id}:0", "own"]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"debits": []}, "debits: List should have at least 1 item after validation, not 0"),
        ({"debits": [item("a", 1)] * 1001}, "debits: List should have at most 1000 items"),
        ({"debits": item("a", 1)}, "debits: Input should be a valid array"),
        ({"debits": [item("a", 1)], "user_id": "a"}, "user_id: unknown argument"),
        (
            {"debits": [item("a", 1)] * 3 + [{**item("a", 1), "amount": "5"}]},
            "debits.3.amount: Input should be",
        ),
        ({"debits": [item("a", 1), {**item("a", 1), "x": 1}]}, "debits.1.x: unknown argument"),
    ],
)
def test_malformed_debit_batch_changes_nothing(
    e2e: Celery, kwargs: dict[str, Any], error: str
) -> None:
    open_account(e2e, "a", 100)
    before = dbstate.snapshot()
    out = call(e2e, "tokens.debit_batch", **kwargs)
    assert (out["success"], out["error_code"]) == (False, "VALIDATION_ERROR")
    assert out["error"].startswith(f"Invalid arguments: {error}")
    assert dbstate.snapshot() == before
