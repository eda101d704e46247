"""tokens.reserve / capture / release and reservations.expire through real worker processes."""

from __future__ import annotations

import uuid
from typing import Any

from celery import Celery
from sqlalchemy import text

from tests.dbstate import CAPTURE_KEYS
from tests.support import assert_ledger_consistent, call, tasks_done_by_worker, workers_that_ran
from worker.db import get_engine, session_scope


def sql(statement: str, **params: Any) -> list[Any]:
    with get_engine().begin() as conn:
        result = conn.execute(text(statement), params)
        return list(result.all()) if result.returns_rows else []


def status(reservation_id: str) -> str:
    ((found,),) = sql("SELECT status FROM reservations WHERE id = :r", r=reservation_id)
    return str(found)


def assert_consistent(app: Celery) -> None:
    """Balances equal their ledger; tokens_reserved equals the active reservations, >= 0."""
    assert call(app, "ledger.reconcile")["mismatches"] == []
    off = sql(
        """
        SELECT a.user_id FROM accounts a LEFT JOIN reservations r
          ON r.user_id = a.user_id AND r.status = 'active'
        GROUP BY a.user_id, a.tokens_reserved
        HAVING a.tokens_reserved <> COALESCE(SUM(r.amount), 0) OR a.tokens_reserved < 0
        """
    )
    assert off == []


def send_together(app: Celery, *tasks: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    results = [app.send_task(name, kwargs=kwargs) for name, kwargs in tasks]
    return [r.get(timeout=60) for r in results]


def test_fifty_simultaneous_reservations_of_30_on_1000_hold_exactly_33(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="hot", initial_balance=1000)
    before = tasks_done_by_worker(e2e, "tokens.reserve")
    results = [
        e2e.send_task("tokens.reserve", kwargs={"user_id": "hot", "amount": 30}) for _ in range(50)
    ]
    outcomes = [r.get(timeout=60) for r in results]
    ok = [o for o in outcomes if o["success"]]
    refused = [o for o in outcomes if not o["success"]]
    assert len(ok) == 33
    assert {(o["error_code"], o["error"]) for o in refused} == {
        ("INSUFFICIENT_TOKENS", "Insufficient tokens. Required: 30, Available: 10")
    }
    assert len(refused) == 17
    assert sorted(o["tokens_available"] for o in ok) == list(range(10, 1000, 30))
    balance = call(e2e, "tokens.get_balance", user_id="hot")
    assert (balance["tokens_balance"], balance["tokens_reserved"]) == (1000, 990)
    assert balance["tokens_available"] == 10
    assert call(e2e, "ledger.user_entries", user_id="hot")["entries"][0]["tokens_amount"] == 1000
    assert_consistent(e2e)
    assert workers_that_ran(e2e, "tokens.reserve", before) >= {"w1", "w2"}  # a real race


def test_reserve_capture_release_through_the_worker(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u", initial_balance=100)
    r1 = call(e2e, "tokens.reserve", user_id="u", operation_type="image_generation")
    assert set(r1) == {
        "success",
        "reservation_id",
        "amount",
        "expires_at",
        "tokens_available",
        "replayed",
    }
    assert (r1["success"], r1["amount"], r1["tokens_available"]) == (True, 10, 90)
    assert r1["expires_at"].endswith("+00:00")
    r2 = call(e2e, "tokens.reserve", user_id="u", amount=40, ttl_seconds=60, metadata={"job": 7})
    assert r2["tokens_available"] == 50
    # Held tokens are not there for a debit.
    refused = call(e2e, "tokens.debit", user_id="u", amount=60, operation_type="image_generation")
    assert refused["error"] == "Insufficient tokens. Required: 60, Available: 50"

    captured = call(e2e, "tokens.capture", reservation_id=r2["reservation_id"], amount=25)
    assert set(captured) == CAPTURE_KEYS
    assert captured == {
        "success": True,
        "user_id": "u",
        "operation_type": "capture",
        "amount": -25,
        "balance_before": 100,
        "new_balance": 75,
        "tokens_spent": 25,
        "ledger_entry_id": captured["ledger_entry_id"],
        "replayed": False,
        "overcaptured": 0,
        "shortfall": 0,
    }
    released = call(e2e, "tokens.release", reservation_id=r1["reservation_id"], reason="done")
    assert released == {
        "success": True,
        "reservation_id": r1["reservation_id"],
        "status": "released",
    }
    balance = call(e2e, "tokens.get_balance", user_id="u")
    assert (balance["tokens_balance"], balance["tokens_reserved"], balance["tokens_spent"]) == (
        75,
        0,
        25,
    )
    entries = call(e2e, "ledger.user_entries", user_id="u")["entries"]
    assert [(e["tokens_amount"], e["metadata"]) for e in entries] == [
        (-25, {"job": 7, "reservation_id": r2["reservation_id"]}),
        (100, {"reason": "initial_balance"}),
    ]
    assert entries[0]["id"] == captured["ledger_entry_id"]
    assert (status(r1["reservation_id"]), status(r2["reservation_id"])) == ("released", "captured")
    assert_consistent(e2e)


def test_capture_and_release_replay_a_redelivered_message(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u", initial_balance=100)
    to_capture = call(e2e, "tokens.reserve", user_id="u", amount=30)["reservation_id"]
    to_release = call(e2e, "tokens.reserve", user_id="u", amount=20)["reservation_id"]
    outcomes = {}
    for name, kwargs in (
        ("tokens.capture", {"reservation_id": to_capture, "amount": 10}),
        ("tokens.release", {"reservation_id": to_release}),
    ):
        task_id = str(uuid.uuid4())
        first = e2e.send_task(name, kwargs=kwargs, task_id=task_id).get(timeout=30)
        e2e.backend.forget(task_id)
        outcomes[name] = (
            first,
            e2e.send_task(name, kwargs=kwargs, task_id=task_id).get(timeout=30),
        )
    first, again = outcomes["tokens.capture"]
    assert first["success"] and first["replayed"] is False
    assert again == {**first, "replayed": True}
    first, again = outcomes["tokens.release"]
    assert first == again == {"success": True, "reservation_id": to_release, "status": "released"}
    # A new message is a new request: the reservation has ended.
    assert call(e2e, "tokens.capture", reservation_id=to_capture) == {
        "success": False,
        "error": "Reservation is captured",
        "error_code": "RESERVATION_NOT_ACTIVE",
    }
    assert call(e2e, "tokens.release", reservation_id=to_release) == {
        "success": False,
        "error": "Reservation is released",
        "error_code": "RESERVATION_NOT_ACTIVE",
    }
    balance = call(e2e, "tokens.get_balance", user_id="u")
    assert (balance["tokens_balance"], balance["tokens_reserved"]) == (90, 0)
    assert len(call(e2e, "ledger.user_entries", user_id="u")["entries"]) == 2
    assert_consistent(e2e)


def test_refusals_through_the_worker(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u", initial_balance=100)
    rid = call(e2e, "tokens.reserve", user_id="u", amount=30)["reservation_id"]

    def refusal(name: str, **kwargs: Any) -> tuple[str, str]:
        out = call(e2e, name, **kwargs)
        assert set(out) == {"success", "error", "error_code"} and out["success"] is False
        return out["error_code"], out["error"]

    assert refusal("tokens.reserve", user_id="ghost", amount=5) == (
        "USER_NOT_FOUND",
        "User not found",
    )
    assert refusal("tokens.reserve", user_id="u", amount=0) == (
        "INVALID_AMOUNT",
        "Reserve amount must be positive",
    )
    assert refusal("tokens.reserve", user_id="u", amount=71) == (
        "INSUFFICIENT_TOKENS",
        "Insufficient tokens. Required: 71, Available: 70",
    )
    assert refusal("tokens.reserve", user_id="u", operation_type="refund") == (
        "NOT_CHARGEABLE",
        "Operation type refund has no cost",
    )
    assert refusal("tokens.reserve", user_id="u", operation_type="nope") == (
        "UNKNOWN_OPERATION_TYPE",
        "Unknown operation type: nope",
    )
    code, message = refusal("tokens.reserve", user_id="u")
    assert code == "VALIDATION_ERROR" and "amount" in message and "operation_type" in message
    for bad in ({"amount": "10"}, {"amount": 1.5}, {"amount": True}, {"ttl_seconds": 0}):
        code, message = refusal("tokens.reserve", user_id="u", **{"amount": 5, **bad})
        assert code == "VALIDATION_ERROR"
        assert next(iter(bad)) in message
    assert refusal("tokens.reserve", user_id="u", amount=5, ttl_seconds=604801)[0] == (
        "VALIDATION_ERROR"
    )
    assert refusal("tokens.capture", reservation_id="nope") == (
        "RESERVATION_NOT_FOUND",
        "Reservation not found",
    )
    assert refusal("tokens.capture", reservation_id=rid, amount=0) == (
        "INVALID_AMOUNT",
        "Capture amount must be positive",
    )
    assert refusal("tokens.capture", reservation_id=rid, amount=31) == (
        "CAPTURE_EXCEEDS_RESERVATION",
        "Capture exceeds reservation. Reserved: 30, Requested: 31",
    )
    assert refusal("tokens.release", reservation_id="nope") == (
        "RESERVATION_NOT_FOUND",
        "Reservation not found",
    )
    assert refusal("reservations.expire", extra=1)[0] == "VALIDATION_ERROR"
    balance = call(e2e, "tokens.get_balance", user_id="u")
    assert (balance["tokens_balance"], balance["tokens_reserved"]) == (100, 30)
    assert status(rid) == "active"


def test_expire_releases_every_due_reservation_in_chunks(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="u", initial_balance=100)
    live = call(e2e, "tokens.reserve", user_id="u", amount=30)["reservation_id"]
    due = call(e2e, "tokens.reserve", user_id="u", amount=20)["reservation_id"]
    sql("UPDATE reservations SET expires_at = now() - interval '1 second' WHERE id = :r", r=due)
    # Past the chunk size (5000), so the task has to go round more than once.
    users = 500
    sql(
        "INSERT INTO accounts SELECT 'bulk' || g, 'Gift', 0, 21, 0, NULL, NULL, now(), now() "
        "FROM generate_series(1, :n) g",
        n=users,
    )
    sql(
        "INSERT INTO reservations SELECT gen_random_uuid()::text, 'bulk' || (1 + g % :n), 1, "
        "NULL, 'active', now() - g * interval '1 millisecond', now(), NULL, NULL, NULL, '{}' "
        "FROM generate_series(0, :r - 1) g",
        n=users,
        r=users * 21,
    )
    assert call(e2e, "reservations.expire") == {"success": True, "expired": users * 21 + 1}
    assert call(e2e, "reservations.expire") == {"success": True, "expired": 0}
    assert (status(live), status(due)) == ("active", "expired")
    assert sql("SELECT DISTINCT tokens_reserved FROM accounts WHERE user_id LIKE 'bulk%'") == [(0,)]
    assert call(e2e, "tokens.get_balance", user_id="u")["tokens_reserved"] == 30
    assert call(e2e, "tokens.capture", reservation_id=due)["error"] == "Reservation is expired"
    assert call(e2e, "tokens.release", reservation_id=due)["error"] == "Reservation is expired"
    assert_consistent(e2e)


def test_capture_racing_release_through_the_workers_ends_once(e2e: Celery) -> None:
    for i in range(10):
        user = f"race{i}"
        call(e2e, "tokens.open_account", user_id=user, initial_balance=100)
        call(e2e, "tokens.reserve", user_id=user, amount=15)
        rid = call(e2e, "tokens.reserve", user_id=user, amount=30)["reservation_id"]
        captured, released = send_together(
            e2e,
            ("tokens.capture", {"reservation_id": rid}),
            ("tokens.release", {"reservation_id": rid}),
        )
        assert captured["success"] != released["success"], (captured, released)
        winner = "captured" if captured["success"] else "released"
        loser = released if captured["success"] else captured
        assert loser["error"] == f"Reservation is {winner}"
        assert status(rid) == winner
        balance = call(e2e, "tokens.get_balance", user_id=user)
        expected = 70 if captured["success"] else 100
        assert (balance["tokens_balance"], balance["tokens_reserved"]) == (expected, 15)
    assert_consistent(e2e)


def ledger_consistent() -> None:
    with session_scope() as session:
        assert_ledger_consistent(session)


def test_settle_metered_usage_extend_then_over_capture_through_the_worker(e2e: Celery) -> None:
    call(e2e, "tokens.open_account", user_id="m", initial_balance=100)
    held = call(e2e, "tokens.reserve", user_id="m", amount=40, overcapture_limit=30, ttl_seconds=60)
    assert held["tokens_available"] == 60
    # The stream runs long: hold more and keep it alive; a redelivered extend applies once.
    task_id = str(uuid.uuid4())
    kwargs = {"reservation_id": held["reservation_id"], "amount": 20, "ttl_seconds": 600}
    grown = e2e.send_task("tokens.extend", kwargs=kwargs, task_id=task_id).get(timeout=30)
    e2e.backend.forget(task_id)
    again = e2e.send_task("tokens.extend", kwargs=kwargs, task_id=task_id).get(timeout=30)
    assert grown == again
    assert (grown["success"], grown["amount"], grown["tokens_available"]) == (True, 60, 40)
    assert grown["expires_at"] > held["expires_at"]
    assert call(e2e, "tokens.extend", reservation_id=held["reservation_id"], amount=41) == {
        "success": False,
        "error": "Insufficient tokens. Required: 41, Available: 40",
        "error_code": "INSUFFICIENT_TOKENS",
    }
    beyond = call(e2e, "tokens.capture", reservation_id=held["reservation_id"], amount=91)
    assert (beyond["error_code"], beyond["error"]) == (
        "CAPTURE_EXCEEDS_RESERVATION",
        "Capture exceeds reservation. Reserved: 90, Requested: 91",
    )
    # The actual cost came in at 90: 60 held, 30 beyond the hold from the 40 available.
    captured = call(e2e, "tokens.capture", reservation_id=held["reservation_id"], amount=90)
    assert {k: captured[k] for k in ("amount", "new_balance", "overcaptured", "shortfall")} == {
        "amount": -90,
        "new_balance": 10,
        "overcaptured": 30,
        "shortfall": 0,
    }
    assert call(e2e, "tokens.extend", reservation_id=held["reservation_id"], ttl_seconds=60) == {
        "success": False,
        "error": "Reservation is captured",
        "error_code": "RESERVATION_NOT_ACTIVE",
    }
    # An estimate too low with nothing left: the shortfall becomes debt, paid by the next credit.
    low = call(e2e, "tokens.reserve", user_id="m", amount=10, overcapture_limit=15)
    short = call(e2e, "tokens.capture", reservation_id=low["reservation_id"], amount=25)
    assert (short["new_balance"], short["overcaptured"], short["shortfall"]) == (-15, 15, 15)
    balance = call(e2e, "tokens.get_balance", user_id="m")
    assert (balance["tokens_balance"], balance["debt"]) == (-15, 15)
    assert call(e2e, "tokens.credit", user_id="m", amount=20)["new_balance"] == 5
    assert call(e2e, "tokens.get_balance", user_id="m")["debt"] == 0
    assert_consistent(e2e)
    ledger_consistent()
