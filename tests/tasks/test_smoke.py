from celery import Celery

from tests.support import call


def test_debit_through_worker(e2e: Celery) -> None:
    assert call(e2e, "tokens.open_account", user_id="u1", initial_balance=100)["created"]
    out = call(e2e, "tokens.debit", user_id="u1", amount=10, operation_type="image_generation")
    assert out["success"] and out["new_balance"] == 90
