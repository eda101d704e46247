"""The three guards of the ledger, each through real workers; each fails without its guard."""

from __future__ import annotations

import uuid

from celery import Celery

from tests.support import call, tasks_done_by_worker, workers_that_ran


def test_concurrent_debits_never_overspend(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="hot", initial_balance=1000)
    before = tasks_done_by_worker(e2e, "tokens.debit")
    results = [
        e2e.send_task(
            "tokens.debit",
            kwargs={"user_id": "hot", "amount": 10, "operation_type": "image_generation"},
        )
        for _ in range(200)
    ]
    outcomes = [r.get(timeout=60) for r in results]
    ok = [o for o in outcomes if o["success"]]
    refused = [o for o in outcomes if not o["success"]]
    assert len(ok) == 100
    assert len(refused) == 100
    assert {o["error_code"] for o in refused} == {"INSUFFICIENT_TOKENS"}
    assert sorted(o["new_balance"] for o in ok) == list(range(0, 1000, 10))
    balance = call(e2e, "tokens.get_balance", user_id="hot")
    assert balance["tokens_balance"] == 0
    assert balance["tokens_spent"] == 1000
    assert call(e2e, "ledger.reconcile")["mismatches"] == []
    assert workers_that_ran(e2e, "tokens.debit", before) >= {"w1", "w2"}  # a real race


def test_same_message_delivered_twice_applies_once(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u", initial_balance=100)
    task_id = str(uuid.uuid4())
    kwargs = {"user_id": "u", "amount": 30, "operation_type": "image_generation"}
    first = e2e.send_task("tokens.debit", kwargs=kwargs, task_id=task_id).get(timeout=30)
    e2e.backend.forget(task_id)
    second = e2e.send_task("tokens.debit", kwargs=kwargs, task_id=task_id).get(timeout=30)
    assert first["replayed"] is False
    assert second == {**first, "replayed": True}
    assert call(e2e, "tokens.get_balance", user_id="u")["tokens_balance"] == 70
    entries = call(e2e, "ledger.user_entries", user_id="u")["entries"]
    assert [e["tokens_amount"] for e in entries] == [-30, 100]
    assert entries[0]["idempotency_key"] == task_id


def test_idempotency_key_reused_with_another_amount_is_refused(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u", initial_balance=100)
    base = {"user_id": "u", "operation_type": "image_generation", "idempotency_key": "order-1"}
    first = call(e2e, "tokens.debit", amount=10, **base)
    again = call(e2e, "tokens.debit", amount=10, **base)
    other = call(e2e, "tokens.debit", amount=20, **base)
    assert first["success"] and not first["replayed"]
    assert again == {**first, "replayed": True}
    assert other == {
        "success": False,
        "error": "Idempotency key reused with different parameters",
        "error_code": "IDEMPOTENCY_CONFLICT",
    }
    assert call(e2e, "tokens.get_balance", user_id="u")["tokens_balance"] == 90
