"""ledger.* tasks through real workers: entries, periods, totals, pruning, reconciliation."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from celery import Celery

from tests import dbstate
from tests.dbstate import ENTRY_KEYS
from tests.support import call

JAN, FEB, MAR, APR = (datetime(2026, m, 1, tzinfo=UTC) for m in (1, 2, 3, 4))


def ids(out: dict[str, Any]) -> list[str]:
    assert set(out) == {"success", "entries"}
    assert out["success"] is True
    return [e["id"] for e in out["entries"]]


@pytest.fixture
def history(e2e: Celery) -> dict[str, str]:
    """User ``u``: four movements dated the first of Jan..Apr 2026; user ``v``: one debit today.
    Returns the entry ids by month."""
    call(e2e, "tokens.open_account", user_id="u")
    movements: list[tuple[str, str, dict[str, Any]]] = [
        ("jan", "tokens.credit", {"amount": 100}),
        ("feb", "tokens.debit", {"amount": 30, "operation_type": "image_generation"}),
        ("mar", "tokens.charge", {"operation_type": "chatgpt_message"}),
        ("apr", "tokens.refund", {"amount": 4}),
    ]
    by_month: dict[str, str] = {}
    for (month, name, kwargs), when in zip(movements, (JAN, FEB, MAR, APR), strict=True):
        out = call(e2e, name, user_id="u", **kwargs)
        dbstate.backdate(out["ledger_entry_id"], when)
        by_month[month] = out["ledger_entry_id"]
    call(e2e, "tokens.open_account", user_id="v", initial_balance=50)
    by_month["v"] = call(
        e2e, "tokens.debit", user_id="v", amount=10, operation_type="image_generation"
    )["ledger_entry_id"]
    return by_month


def test_entry_fields(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u", initial_balance=100)
    debit = call(
        e2e,
        "tokens.debit",
        user_id="u",
        amount=10,
        operation_type="image_generation",
        metadata={"job": 1},
        idempotency_key="job-1",
    )
    refund = call(
        e2e, "tokens.refund", user_id="u", amount=3, original_entry_id=debit["ledger_entry_id"]
    )
    entries = call(e2e, "ledger.user_entries", user_id="u")["entries"]
    assert len(entries) == 3
    assert [e["id"] for e in entries[:2]] == [refund["ledger_entry_id"], debit["ledger_entry_id"]]
    for entry in entries:
        assert set(entry) == ENTRY_KEYS
        assert isinstance(entry["id"], str)
        assert entry["created_at"].endswith("+00:00")
        datetime.fromisoformat(entry["created_at"])
    newest, middle, oldest = entries
    assert newest == {
        "id": refund["ledger_entry_id"],
        "user_id": "u",
        "operation_type": "refund",
        "tokens_amount": 3,
        "balance_before": 90,
        "balance_after": 93,
        "idempotency_key": newest["idempotency_key"],  # the task id: no key was given
        "original_entry_id": debit["ledger_entry_id"],
        "metadata": {},
        "created_at": newest["created_at"],
        "grants": newest["grants"],
        "prev_hash": middle["hash"],  # v1.2: each chains to the one before it
        "hash": newest["hash"],
        "spent_by": None,  # v1.2: the account's own movement
    }
    assert (oldest["prev_hash"], middle["prev_hash"]) == ("0" * 64, oldest["hash"])
    # The refund went back into the grant the debit spent (v1.1).
    assert newest["grants"] == [{"grant_id": middle["grants"][0]["grant_id"], "amount": 3}]
    assert isinstance(newest["idempotency_key"], str)
    assert (middle["idempotency_key"], middle["metadata"]) == ("job-1", {"job": 1})
    assert (middle["tokens_amount"], middle["original_entry_id"]) == (-10, None)
    assert (oldest["operation_type"], oldest["tokens_amount"]) == ("adjustment", 100)


def test_user_entries_newest_first_with_paging(e2e: Celery, history: dict[str, str]) -> None:
    expected = [history[m] for m in ("apr", "mar", "feb", "jan")]
    assert ids(call(e2e, "ledger.user_entries", user_id="u")) == expected
    assert ids(call(e2e, "ledger.user_entries", user_id="u", limit=2)) == expected[:2]
    assert ids(call(e2e, "ledger.user_entries", user_id="u", limit=2, offset=2)) == expected[2:]
    assert ids(call(e2e, "ledger.user_entries", user_id="u", limit=1000, offset=4)) == []
    assert ids(call(e2e, "ledger.user_entries", user_id="nobody")) == []


def test_user_entries_by_type_and_period(e2e: Celery, history: dict[str, str]) -> None:
    out = call(e2e, "ledger.user_entries", user_id="u", operation_type="image_generation")
    assert ids(out) == [history["feb"]]
    # start inclusive, end exclusive; offsets are honoured.
    out = call(
        e2e,
        "ledger.user_entries",
        user_id="u",
        start_date="2026-02-01T01:00:00+01:00",
        end_date="2026-04-01T00:00:00Z",
    )
    assert ids(out) == [history["mar"], history["feb"]]
    out = call(e2e, "ledger.user_entries", user_id="u", start_date="2026-03-01T00:00:00.000001")
    assert ids(out) == [history["apr"]]
    out = call(e2e, "ledger.user_entries", user_id="u", end_date="2026-01-01T00:00:01+00:00")
    assert ids(out) == [history["jan"]]
    assert out["entries"][0]["created_at"] == "2026-01-01T00:00:00+00:00"


def test_entries_by_type_spans_users(e2e: Celery, history: dict[str, str]) -> None:
    out = call(e2e, "ledger.entries_by_type", operation_type="image_generation")
    assert ids(out) == [history["v"], history["feb"]]
    for entry in out["entries"]:
        assert set(entry) == ENTRY_KEYS
    out = call(
        e2e, "ledger.entries_by_type", operation_type="image_generation", end_date="2026-06-01"
    )
    assert ids(out) == [history["feb"]]
    out = call(e2e, "ledger.entries_by_type", operation_type="image_generation", limit=1, offset=1)
    assert ids(out) == [history["feb"]]
    assert ids(call(e2e, "ledger.entries_by_type", operation_type="sora_image")) == []


def test_totals(e2e: Celery, history: dict[str, str]) -> None:
    assert call(e2e, "ledger.total_spent", user_id="u") == {"success": True, "total": 35}
    assert call(e2e, "ledger.total_earned", user_id="u") == {"success": True, "total": 104}
    period = {"start_date": "2026-02-01T00:00:00Z", "end_date": "2026-03-01T00:00:00Z"}
    assert call(e2e, "ledger.total_spent", user_id="u", **period)["total"] == 30
    assert call(e2e, "ledger.total_earned", user_id="u", **period)["total"] == 0
    assert call(e2e, "ledger.total_spent", user_id="nobody") == {"success": True, "total": 0}


def test_statistics(e2e: Celery, history: dict[str, str]) -> None:
    assert call(e2e, "ledger.statistics", user_id="u") == {
        "success": True,
        "total_spent": 35,
        "total_earned": 104,
        "net_change": 69,
        "operation_count": 4,
        "by_type": {
            "chatgpt_message": {"count": 1, "total": -5},
            "image_generation": {"count": 1, "total": -30},
            "purchase": {"count": 1, "total": 100},
            "refund": {"count": 1, "total": 4},
        },
    }
    out = call(e2e, "ledger.statistics", user_id="u", start_date="2026-03-01T00:00:00Z")
    assert (out["total_spent"], out["total_earned"], out["net_change"]) == (5, 4, -1)
    assert out["operation_count"] == 2
    assert set(out["by_type"]) == {"chatgpt_message", "refund"}


def test_delete_old_entries_carries_the_sum_forward(e2e: Celery, history: dict[str, str]) -> None:
    out = call(e2e, "ledger.delete_old_entries", older_than="2026-03-01T00:00:00+00:00")
    assert out == {"success": True, "deleted": 2}
    entries = call(e2e, "ledger.user_entries", user_id="u")["entries"]
    assert [e["id"] for e in entries[:2]] == [history["apr"], history["mar"]]
    [carried] = entries[2:]
    assert set(carried) == ENTRY_KEYS
    assert carried["operation_type"] == "carried_forward"
    assert carried["tokens_amount"] == 100 - 30
    assert carried["created_at"] == "2026-02-01T00:00:00+00:00"
    assert carried["metadata"]["entries"] == 2
    # The other user had nothing old: untouched.
    assert ids(call(e2e, "ledger.user_entries", user_id="v"))[0] == history["v"]
    assert len(dbstate.entries("v")) == 2
    assert call(e2e, "ledger.reconcile") == {"success": True, "checked": 2, "mismatches": []}
    assert call(e2e, "ledger.delete_old_entries", older_than="2025-01-01T00:00:00Z") == {
        "success": True,
        "deleted": 0,
    }


def test_reconcile_reports_balances_that_differ_from_their_ledger(
    e2e: Celery, history: dict[str, str]
) -> None:
    assert call(e2e, "ledger.reconcile") == {"success": True, "checked": 2, "mismatches": []}
    dbstate.execute("UPDATE accounts SET tokens_balance = tokens_balance + 1 WHERE user_id = 'v'")
    call(e2e, "tokens.open_account", user_id="empty")
    dbstate.execute("UPDATE accounts SET tokens_balance = 9 WHERE user_id = 'empty'")
    assert call(e2e, "ledger.reconcile") == {
        "success": True,
        "checked": 3,
        "mismatches": [
            {
                "user_id": "empty",
                "balance": 9,
                "ledger_sum": 0,
                "grants_balance": 0,
                "bad_grants": [],
            },
            {
                "user_id": "v",
                "balance": 41,
                "ledger_sum": 40,
                "grants_balance": 40,
                "bad_grants": [],
            },
        ],
    }
    assert call(e2e, "ledger.reconcile", user_id="u") == {
        "success": True,
        "checked": 1,
        "mismatches": [],
    }


def test_verify_reports_an_entry_changed_behind_the_workers_back(
    e2e: Celery, history: dict[str, str]
) -> None:
    """history() backdated u's entries behind the worker's back: their chain no longer holds
    (created_at is hashed); v's, written by the worker alone, does."""
    assert call(e2e, "ledger.verify", user_id="v") == {"success": True, "checked": 2, "broken": []}
    dbstate.execute(
        "UPDATE ledger_entries SET metadata = '{\"edited\": true}' WHERE id = :id",
        id=int(history["v"]),
    )
    assert call(e2e, "ledger.verify", user_id="v") == {
        "success": True,
        "checked": 2,
        "broken": [{"user_id": "v", "entry_id": history["v"], "reason": "hash"}],
    }
    everyone = call(e2e, "ledger.verify")
    assert everyone["checked"] == 6
    assert {b["user_id"] for b in everyone["broken"]} == {"u", "v"}
