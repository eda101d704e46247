"""idempotency.prune through real worker processes: records past the retention go, the rest
keep replaying."""

from __future__ import annotations

from celery import Celery

from tests import dbstate
from tests.support import call


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
