"""Housekeeping through real worker processes: idempotency.prune (records past the retention
go, the rest keep replaying) and grants.expire."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from celery import Celery

from tests import dbstate
from tests.support import assert_ledger_consistent, call
from worker.db import session_scope


def test_prune_deletes_records_past_the_retention_only(e2e: Celery) -> None:
    assert call(e2e, "tokens.open_account", user_id="u", initial_balance=100)["created"]
    debit = {"user_id": "u", "amount": 10, "operation_type": "image_generation"}
    old = call(e2e, "tokens.debit", **debit, idempotency_key="old")
    call(e2e, "tokens.debit", **debit, idempotency_key="recent")
    dbstate.execute(
        "UPDATE idempotency_records SET created_at = clock_timestamp() - interval '8 days'"
        " WHERE key = 'old'"
    )
    assert call(e2e, "idempotency.prune") == {"success": True, "deleted": 1}
    assert call(e2e, "idempotency.prune") == {"success": True, "deleted": 0}
    assert call(e2e, "tokens.debit", **debit, idempotency_key="recent")["replayed"] is True
    # Past the window the key is free again: the same request applies a second time.
    again = call(e2e, "tokens.debit", **debit, idempotency_key="old")
    assert (again["replayed"], again["new_balance"]) == (False, old["new_balance"] - 20)
    assert call(e2e, "idempotency.prune", extra=1)["error_code"] == "VALIDATION_ERROR"


def test_grants_expire_writes_the_due_grants_expiry(e2e: Celery) -> None:
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    for user in ("a", "b"):
        assert call(e2e, "tokens.open_account", user_id=user, initial_balance=10)["created"]
        for amount in (30, 20):
            credit = {"user_id": user, "amount": amount, "expires_at": soon}
            assert call(e2e, "tokens.credit", **credit)["success"]
    # Burn order: the 30 ends first (same priority, then expiry, then creation): it holds 25.
    assert call(e2e, "tokens.reserve", user_id="b", amount=25)["success"]
    dbstate.execute(
        "UPDATE grants SET expires_at = clock_timestamp() - interval '1 second'"
        " WHERE expires_at IS NOT NULL"
    )
    # a: 30 + 20; b: the 5 of the 30 its reservation does not hold, and the 20.
    assert call(e2e, "grants.expire") == {"success": True, "expired": 4, "tokens_expired": 75}
    assert call(e2e, "grants.expire") == {"success": True, "expired": 0, "tokens_expired": 0}
    assert call(e2e, "tokens.get_balance", user_id="a")["tokens_balance"] == 10
    assert call(e2e, "tokens.get_balance", user_id="b")["tokens_balance"] == 35
    assert call(e2e, "grants.expire", extra=1)["error_code"] == "VALIDATION_ERROR"
    with session_scope() as session:
        assert_ledger_consistent(session)


def test_make_months_keeps_the_ledgers_months_ahead(e2e: Celery) -> None:
    out = call(e2e, "ledger.make_months")
    assert out["success"] is True and out["outside"] == 0
    until = datetime.fromisoformat(out["until"])
    assert until > datetime.now(UTC) + timedelta(days=60)  # three months ahead
    again = call(e2e, "ledger.make_months")
    assert (again["made"], again["until"]) == ([], out["until"])
    assert call(e2e, "ledger.make_months", extra=1)["error_code"] == "VALIDATION_ERROR"
