"""Pools and spend limits (contract v1.2) through real workers: a member opened under a parent,
its debits on the pool's ledger, tokens.set_limit and tokens.limits, LIMIT_EXCEEDED with its
limit, and a member's credit refused."""

from __future__ import annotations

from celery import Celery

from tests.support import assert_ledger_consistent, call
from worker.db import session_scope


def test_a_team_plan_with_a_shared_pool_a_member_cap_and_a_team_cap(e2e: Celery) -> None:
    assert call(e2e, "tokens.open_account", user_id="acme", initial_balance=1000)["success"]
    team = call(e2e, "tokens.open_account", user_id="acme-eng", parent_id="acme")
    assert (team["pool_id"], team["parent_id"], team["tokens_balance"]) == ("acme", "acme", 1000)
    call(e2e, "tokens.open_account", user_id="ana", parent_id="acme-eng")
    assert call(e2e, "tokens.open_account", user_id="x", parent_id="ghost") == {
        "success": False,
        "error": "Parent account not found",
        "error_code": "PARENT_NOT_FOUND",
    }
    daily = call(e2e, "tokens.set_limit", user_id="ana", name="daily", max_tokens=30, period="day")
    assert daily["limits"][0]["name"] == "daily" and daily["limits"][0]["used"] == 0
    call(
        e2e,
        "tokens.set_limit",
        user_id="acme",
        name="monthly",
        max_tokens=500,
        period="month",
    )
    spent = call(e2e, "tokens.debit", user_id="ana", amount=25, operation_type="image_generation")
    assert (spent["user_id"], spent["new_balance"], spent["tokens_spent"]) == ("ana", 975, 25)
    refused = call(e2e, "tokens.debit", user_id="ana", amount=10, operation_type="image_generation")
    assert refused["error_code"] == "LIMIT_EXCEEDED"
    assert refused["error"] == (
        "Spend limit exceeded: daily on ana. Limit: 30, Used: 25, Requested: 10"
    )
    assert (refused["limit"]["user_id"], refused["limit"]["remaining"]) == ("ana", 5)
    listed = call(e2e, "tokens.limits", user_id="ana")["limits"]
    assert [(x["user_id"], x["name"], x["used"]) for x in listed] == [
        ("ana", "daily", 25),
        ("acme", "monthly", 25),
    ]
    assert (
        call(e2e, "tokens.can_afford", user_id="ana", operation_type="image_generation")["limit"][
            "name"
        ]
        == "daily"
    )
    assert call(e2e, "tokens.credit", user_id="ana", amount=5)["error"] == (
        "Account is a member of acme: move tokens on the pool"
    )
    [entry] = call(e2e, "ledger.user_entries", user_id="ana")["entries"]
    assert (entry["user_id"], entry["spent_by"], entry["id"]) == (
        "acme",
        "ana",
        spent["ledger_entry_id"],
    )
    removed = call(e2e, "tokens.set_limit", user_id="ana", name="daily", max_tokens=None)
    assert removed["limits"] == []
    with session_scope() as s:
        assert_ledger_consistent(s)


def test_a_members_hold_capture_and_batch_through_the_worker(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="pool", initial_balance=100)
    call(e2e, "tokens.open_account", user_id="mia", parent_id="pool")
    call(e2e, "tokens.set_limit", user_id="mia", name="hourly", max_tokens=40, period="hour")
    held = call(e2e, "tokens.reserve", user_id="mia", amount=30, overcapture_limit=20)
    assert (held["amount"], held["tokens_available"]) == (30, 70)
    refused = call(e2e, "tokens.extend", reservation_id=held["reservation_id"], amount=11)
    assert (refused["error_code"], refused["limit"]["used"]) == ("LIMIT_EXCEEDED", 30)
    captured = call(e2e, "tokens.capture", reservation_id=held["reservation_id"], amount=45)
    assert (captured["user_id"], captured["amount"], captured["overcaptured"]) == ("mia", -45, 15)
    out = call(
        e2e,
        "tokens.debit_batch",
        debits=[
            {"user_id": "pool", "amount": 5, "operation_type": "image_generation"},
            {"user_id": "mia", "amount": 1, "operation_type": "image_generation"},
        ],
    )
    assert (out["applied"], out["refused"]) == (1, 1)
    assert out["results"][1]["limit"]["name"] == "hourly"
    assert call(e2e, "tokens.get_balance", user_id="mia")["tokens_balance"] == 50
    with session_scope() as s:
        assert_ledger_consistent(s)
