"""tokens.open_account, set_tier, get_balance, can_afford through real workers."""

from __future__ import annotations

from datetime import timedelta

from celery import Celery

from tests import dbstate
from tests.dbstate import BALANCE_KEYS, FAILURE_KEYS
from tests.support import assert_ledger_consistent, call
from worker.db import session_scope

NOT_FOUND = {"success": False, "error": "User not found", "error_code": "USER_NOT_FOUND"}


def test_open_account_returns_balance_fields_and_writes_initial_balance_as_adjustment(
    e2e: Celery,
) -> None:
    out = call(e2e, "tokens.open_account", user_id="u1", initial_balance=250)
    assert out == {
        "success": True,
        "user_id": "u1",
        "tokens_balance": 250,
        "tokens_reserved": 0,
        "tokens_available": 250,
        "tokens_spent": 0,
        "tier": "Gift",
        "last_renewal_at": None,
        "subscription_expires_at": None,
        "by_kind": {"adjustment": 250},
        "debt": 0,
        "next_expiry": None,
        # v1.2: both null for a pool, which every account outside a tree is
        "pool_id": None,
        "parent_id": None,
        "created": True,
    }
    [entry] = dbstate.entries("u1")
    assert (entry["operation_type"], entry["tokens_amount"]) == ("adjustment", 250)
    assert (entry["balance_before"], entry["balance_after"]) == (0, 250)


def test_open_account_without_initial_balance_writes_no_entry(e2e: Celery) -> None:
    out = call(e2e, "tokens.open_account", user_id="u1")
    assert out["created"] is True
    assert out["tokens_balance"] == 0
    assert dbstate.entries("u1") == []


def test_open_existing_account_changes_nothing(e2e: Celery) -> None:
    first = call(e2e, "tokens.open_account", user_id="u1", initial_balance=100)
    before = dbstate.snapshot()
    again = call(
        e2e,
        "tokens.open_account",
        user_id="u1",
        tier="Business",
        initial_balance=5000,
        subscription_expires_at="2030-01-01T00:00:00Z",
    )
    assert again == {**first, "created": False}
    assert dbstate.snapshot() == before


def test_open_account_dates_come_back_in_utc_with_offset(e2e: Celery) -> None:
    out = call(
        e2e,
        "tokens.open_account",
        user_id="imported",
        tier="Professional",
        subscription_expires_at="2027-03-01T12:00:00+02:00",
        last_renewal_at="2026-11-01T00:00:00",  # no offset: read as UTC
    )
    assert set(out) == BALANCE_KEYS | {"created"}
    assert out["tier"] == "Professional"
    assert out["subscription_expires_at"] == "2027-03-01T10:00:00+00:00"
    assert out["last_renewal_at"] == "2026-11-01T00:00:00+00:00"
    assert call(e2e, "tokens.get_balance", user_id="imported") == {
        k: v for k, v in out.items() if k != "created"
    }


def test_user_id_is_stored_and_matched_exactly(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id=" Ünïcode user ", initial_balance=7)
    assert call(e2e, "tokens.get_balance", user_id=" Ünïcode user ")["tokens_balance"] == 7
    assert call(e2e, "tokens.get_balance", user_id="Ünïcode user") == NOT_FOUND
    assert call(e2e, "tokens.get_balance", user_id=" ünïcode user ") == NOT_FOUND


def test_open_account_with_negative_initial_balance_is_refused(e2e: Celery) -> None:
    out = call(e2e, "tokens.open_account", user_id="u1", initial_balance=-1)
    assert out == {
        "success": False,
        "error": "Balance cannot be negative",
        "error_code": "NEGATIVE_BALANCE",
    }
    assert dbstate.account("u1") is None


def test_open_account_with_unknown_tier_is_a_validation_error(e2e: Celery) -> None:
    out = call(e2e, "tokens.open_account", user_id="u1", tier="Platinum")
    assert set(out) == FAILURE_KEYS
    assert out["error_code"] == "VALIDATION_ERROR"
    assert "tier" in out["error"] and "Platinum" in out["error"]
    assert dbstate.account("u1") is None


def test_get_balance_reflects_movements(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u1", initial_balance=100)
    call(e2e, "tokens.debit", user_id="u1", amount=30, operation_type="image_generation")
    call(e2e, "tokens.credit", user_id="u1", amount=5)
    out = call(e2e, "tokens.get_balance", user_id="u1")
    assert set(out) == BALANCE_KEYS
    assert out["tokens_balance"] == 75
    assert out["tokens_available"] == 75
    assert out["tokens_spent"] == 30


def test_get_balance_of_unknown_user(e2e: Celery) -> None:
    assert call(e2e, "tokens.get_balance", user_id="ghost") == NOT_FOUND


def test_available_excludes_reserved_tokens(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u1", initial_balance=100)
    dbstate.execute("UPDATE accounts SET tokens_reserved = 40 WHERE user_id = 'u1'")
    out = call(e2e, "tokens.get_balance", user_id="u1")
    assert (out["tokens_balance"], out["tokens_reserved"], out["tokens_available"]) == (100, 40, 60)
    assert call(e2e, "tokens.can_afford", user_id="u1", operation_type="image_generation") == {
        "success": True,
        "can_afford": True,
        "cost": 10,
        "balance": 60,
        "deficit": 0,
    }


def test_set_tier_changes_tier_and_expiry(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u1", initial_balance=10)
    out = call(
        e2e,
        "tokens.set_tier",
        user_id="u1",
        tier="Business",
        subscription_expires_at="2027-01-31T23:00:00-01:00",
    )
    assert set(out) == BALANCE_KEYS
    assert out["tier"] == "Business"
    assert out["subscription_expires_at"] == "2027-02-01T00:00:00+00:00"
    assert out["tokens_balance"] == 10
    # Without an expiry the subscription never lapses: the old date is cleared.
    cleared = call(e2e, "tokens.set_tier", user_id="u1", tier="Professional")
    assert (cleared["tier"], cleared["subscription_expires_at"]) == ("Professional", None)
    assert len(dbstate.entries("u1")) == 1  # a tier change moves no tokens


def test_set_tier_refusals(e2e: Celery) -> None:
    assert call(e2e, "tokens.set_tier", user_id="ghost", tier="Gift") == NOT_FOUND
    call(e2e, "tokens.open_account", user_id="u1")
    out = call(e2e, "tokens.set_tier", user_id="u1", tier="Gold")
    assert out["error_code"] == "VALIDATION_ERROR"
    assert "tier" in out["error"]
    assert call(e2e, "tokens.get_balance", user_id="u1")["tier"] == "Gift"


def test_can_afford(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u1", initial_balance=7)
    short = call(e2e, "tokens.can_afford", user_id="u1", operation_type="image_generation")
    assert short == {"success": True, "can_afford": False, "cost": 10, "balance": 7, "deficit": 3}
    enough = call(e2e, "tokens.can_afford", user_id="u1", operation_type="chatgpt_message")
    assert enough == {"success": True, "can_afford": True, "cost": 5, "balance": 7, "deficit": 0}
    free = call(e2e, "tokens.can_afford", user_id="u1", operation_type="purchase")
    assert (free["can_afford"], free["cost"]) == (True, 0)
    assert dbstate.balance("u1") == 7  # asking moves nothing


def test_can_afford_refusals(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u1", initial_balance=7)
    assert call(e2e, "tokens.can_afford", user_id="u1", operation_type="teleport") == {
        "success": False,
        "error": "Unknown operation type: teleport",
        "error_code": "UNKNOWN_OPERATION_TYPE",
    }
    out = call(e2e, "tokens.can_afford", user_id="ghost", operation_type="image_generation")
    assert out == NOT_FOUND


def test_business_refusal_is_a_successful_task(e2e: Celery) -> None:
    result = e2e.send_task("tokens.get_balance", kwargs={"user_id": "ghost"})
    assert result.get(timeout=30) == NOT_FOUND
    assert result.state == "SUCCESS"


def test_grants_lists_active_grants_in_burn_order_then_ended_ones(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="g", initial_balance=10)  # adjustment, priority 50
    promo = call(e2e, "tokens.credit", user_id="g", amount=5, grant_kind="promo",
                 expires_at="2999-01-01T00:00:00Z")  # fmt: skip
    bought = call(e2e, "tokens.credit", user_id="g", amount=30, priority=60)
    call(e2e, "tokens.debit", user_id="g", amount=8, operation_type="image_generation")
    listed = call(e2e, "tokens.grants", user_id="g")
    assert (listed["success"], listed["user_id"], listed["debt"]) == (True, "g", 0)
    assert [(g["kind"], g["remaining"], g["priority"]) for g in listed["grants"]] == [
        ("adjustment", 7, 50),
        ("purchased", 30, 60),
    ]
    everything = call(e2e, "tokens.grants", user_id="g", include_ended=True)["grants"]
    assert [(g["kind"], g["status"], g["expires_at"]) for g in everything] == [
        ("adjustment", "active", None),
        ("purchased", "active", None),
        ("promo", "depleted", "2999-01-01T00:00:00+00:00"),
    ]
    entries = call(e2e, "ledger.user_entries", user_id="g")["entries"]
    (debit,) = [e for e in entries if e["operation_type"] == "image_generation"]
    ids = {g["kind"]: g["grant_id"] for g in everything}
    assert debit["grants"] == [
        {"grant_id": ids["promo"], "amount": -5},
        {"grant_id": ids["adjustment"], "amount": -3},
    ]
    assert {promo["success"], bought["success"]} == {True}
    assert call(e2e, "tokens.grants", user_id="nobody") == NOT_FOUND
    refused = call(e2e, "tokens.credit", user_id="g", amount=1, expires_at="2000-01-01T00:00:00Z")
    assert refused["error_code"] == "VALIDATION_ERROR" and "expires_at" in refused["error"]
    with session_scope() as session:
        assert_ledger_consistent(session)


def test_get_balance_as_of_an_instant(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u", initial_balance=100)
    debit = call(e2e, "tokens.debit", user_id="u", amount=30, operation_type="image_generation")
    (entry,) = [e for e in dbstate.entries("u") if str(e["id"]) == debit["ledger_entry_id"]]
    at = entry["created_at"]
    before = (at - timedelta(microseconds=1)).isoformat()
    then = call(e2e, "tokens.get_balance", user_id="u", as_of=before)
    assert set(then) == dbstate.BALANCE_KEYS | {"as_of"}
    assert (then["tokens_balance"], then["tokens_spent"], then["as_of"]) == (100, 0, before)
    now = call(e2e, "tokens.get_balance", user_id="u", as_of=at.isoformat())
    assert (now["tokens_balance"], now["tokens_available"], now["tokens_spent"]) == (70, 70, 30)
    assert "as_of" not in call(e2e, "tokens.get_balance", user_id="u")
