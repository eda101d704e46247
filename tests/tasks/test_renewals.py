"""renewals.* through real worker processes: the contract's shapes, and the race."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import text

from tests.polling import wait_for
from tests.support import (
    WorkerProcess,
    call,
    running_workers,
    tasks_done_by_worker,
    waiting_on_locks,
    workers_that_ran,
)
from worker.celery import app as worker_app
from worker.db import get_engine

USERS = 600


def sql(statement: str, **params: Any) -> list[Any]:
    with get_engine().begin() as conn:
        result = conn.execute(text(statement), params)
        return list(result.all()) if result.returns_rows else []


def midnight(moment: datetime) -> datetime:
    return datetime.combine(moment.date(), datetime.min.time(), tzinfo=UTC)


def test_check_eligibility_and_renew_user(e2e: Celery) -> None:
    lapsed = datetime.now(UTC) - timedelta(days=40)
    call(e2e, "tokens.open_account", user_id="pro", tier="Professional", initial_balance=5,
         last_renewal_at=lapsed.isoformat())  # fmt: skip
    call(e2e, "tokens.open_account", user_id="gone", tier="Business",
         subscription_expires_at="2020-01-01T00:00:00+00:00")  # fmt: skip

    assert call(e2e, "renewals.check_eligibility", user_id="pro") == {
        "success": True,
        "user_id": "pro",
        "eligible": True,
        "reason": "Renewal due",
        "next_renewal_date": (midnight(lapsed) + timedelta(days=30)).isoformat(),
        "days_until_renewal": 0,
    }
    renewed = call(e2e, "renewals.renew_user", user_id="pro")
    renewal_date = datetime.fromisoformat(renewed.pop("renewal_date"))
    assert renewed == {
        "success": True,
        "user_id": "pro",
        "tier": "Professional",
        "tokens_added": 2000,
        "previous_balance": 5,
        "new_balance": 2005,
        "tokens_expired": 0,
        "tokens_rolled_over": 0,
    }
    assert renewal_date.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - renewal_date) < timedelta(minutes=1)

    verdict = call(e2e, "renewals.check_eligibility", user_id="pro")
    days = (midnight(renewal_date) + timedelta(days=30) - midnight(datetime.now(UTC))).days
    assert verdict == {
        "success": True,
        "user_id": "pro",
        "eligible": False,
        "reason": f"Next renewal in {days} days",
        "next_renewal_date": (midnight(renewal_date) + timedelta(days=30)).isoformat(),
        "days_until_renewal": days,
    }
    assert call(e2e, "renewals.renew_user", user_id="pro") == {
        "success": False,
        "error": f"Next renewal in {days} days",
        "error_code": "NOT_DUE",
    }
    assert call(e2e, "renewals.renew_user", user_id="gone") == {
        "success": False,
        "error": "Subscription expired",
        "error_code": "SUBSCRIPTION_EXPIRED",
    }
    for name in ("renewals.renew_user", "renewals.check_eligibility"):
        assert call(e2e, name, user_id="nobody")["error_code"] == "USER_NOT_FOUND"
    entries = call(e2e, "ledger.user_entries", user_id="pro")["entries"]
    assert len(entries) == 2  # the renewal, then the initial balance
    assert (entries[0]["operation_type"], entries[0]["tokens_amount"]) == ("monthly_reset", 2000)
    assert entries[0]["metadata"] == {"tier": "Professional", "source": "renew_user"}
    assert (entries[0]["balance_before"], entries[0]["balance_after"]) == (5, 2005)


def test_due_dry_run_and_sweep(e2e: Celery) -> None:
    now = datetime.now(UTC)
    for user_id, tier, last in [
        ("b-never", "Business", None),
        ("g-old", "Gift", now - timedelta(days=60)),
        ("p-old", "Professional", now - timedelta(days=45)),
        ("g-recent", "Gift", now - timedelta(days=2)),
    ]:
        call(e2e, "tokens.open_account", user_id=user_id, tier=tier,
             last_renewal_at=last and last.isoformat())  # fmt: skip
    assert call(e2e, "renewals.due") == {
        "success": True,
        "user_ids": ["b-never", "g-old", "p-old"],
    }
    # Sent with the project's own configuration (as beat sends), renewals go to their own
    # queue, so a long sweep never delays debits. (A bare producer's message lands on the
    # default queue, which workers also serve.)
    routed = worker_app.send_task("renewals.due", kwargs={})
    assert routed.get(timeout=30)["user_ids"] == ["b-never", "g-old", "p-old"]
    assert worker_app.amqp.router.route({}, "renewals.sweep")["queue"].name == "renewals"
    assert call(e2e, "renewals.due", tier="Gift", limit=5)["user_ids"] == ["g-old"]

    counts = {"success": True, "total_processed": 3, "successful": 3, "failed": 0, "skipped": 0}
    assert call(e2e, "renewals.sweep", dry_run=True) == {**counts, "errors": []}
    assert call(e2e, "renewals.due")["user_ids"] == ["b-never", "g-old", "p-old"]
    assert call(e2e, "renewals.sweep", tier="Gift") == {
        **counts,
        "total_processed": 1,
        "successful": 1,
        "errors": [],
    }
    assert call(e2e, "renewals.sweep", limit=1, continue_on_error=False)["successful"] == 1
    assert call(e2e, "renewals.due")["user_ids"] == ["p-old"]
    balances = {u: call(e2e, "tokens.get_balance", user_id=u)["tokens_balance"] for u in
                ("b-never", "g-old", "p-old", "g-recent")}  # fmt: skip
    assert balances == {"b-never": 10000, "g-old": 100, "p-old": 0, "g-recent": 0}


def test_bad_arguments_are_validation_errors(e2e: Celery) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("renewals.sweep", {"limit": 0}),
        ("renewals.sweep", {"tier": "Platinum"}),
        ("renewals.sweep", {"dry_run": "yes"}),
        ("renewals.sweep", {"everyone": True}),
        ("renewals.due", {"limit": 100_001}),
        ("renewals.renew_user", {"user_id": " "}),
        ("renewals.check_eligibility", {}),
    ]
    for name, kwargs in cases:
        out = call(e2e, name, **kwargs)
        assert (out["success"], out["error_code"]) == (False, "VALIDATION_ERROR"), (name, kwargs)


def test_racing_sweeps_and_renew_user_calls_renew_each_user_once(e2e: Celery) -> None:
    """Three sweeps and a renew_user for every one of 600 due users, all in flight at once on
    two worker processes, while a third of the rows is held by another transaction (as a debit
    holds one) until every worker child is blocked on them: every user ends with exactly one
    renewal."""
    sql(
        """
        INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, tokens_spent,
                              last_renewal_at, created_at, updated_at)
        SELECT 'user-' || lpad(i::text, 4, '0'),
               (ARRAY['Gift', 'Professional', 'Business'])[1 + i % 3], 0, 0, 0,
               CASE WHEN i % 2 = 0 THEN NULL
                    ELSE now() - make_interval(days => 30 + i % 40, secs => i) END,
               now(), now()
        FROM generate_series(1, :n) AS i
        """,
        n=USERS,
    )
    user_ids = [f"user-{i:04d}" for i in range(1, USERS + 1)]
    random.Random(3).shuffle(user_ids)
    with get_engine().connect() as holder, holder.begin():
        holder.execute(text("SELECT 1 FROM accounts WHERE right(user_id, 1) IN ('0', '3', '6')"
                            " FOR UPDATE"))  # fmt: skip
        sweeps = [e2e.send_task("renewals.sweep", kwargs={}) for _ in range(3)]
        renewals = [
            e2e.send_task("renewals.renew_user", kwargs={"user_id": user_id})
            for user_id in user_ids
        ]
        # Each sweep skips the held rows, then waits for them; the renew_user calls wait too.
        wait_for(lambda: waiting_on_locks() >= 4, 60, "every worker child blocked")
    swept = [r.get(timeout=120) for r in sweeps]
    renewed = [r.get(timeout=120) for r in renewals]

    by_user = [r for r in renewed if r["success"]]
    refused = [r for r in renewed if not r["success"]]
    assert {r["error_code"] for r in refused} <= {"NOT_DUE"}
    for s in swept:
        assert (s["success"], s["failed"], s["errors"]) == (True, 0, [])
        assert s["total_processed"] == s["successful"] + s["skipped"]
    assert sum(s["successful"] for s in swept) + len(by_user) == USERS

    entries = sql(
        "SELECT user_id, count(*) FROM ledger_entries"
        " WHERE operation_type = 'monthly_reset' GROUP BY user_id"
    )
    assert len(entries) == USERS
    assert {count for _, count in entries} == {1}
    assert call(e2e, "ledger.reconcile")["mismatches"] == []
    assert call(e2e, "renewals.due")["user_ids"] == []


def test_no_renewals_task_outlives_the_visibility_timeout() -> None:
    """Every renewals task runs under the global time limit, below the visibility timeout, so
    none is delivered a second time while it still runs."""
    import tasks.renewals  # noqa: F401  (registers the renewals tasks in this process)
    from worker.settings import get_settings

    visibility = get_settings().visibility_timeout
    for name in ("renewals.sweep", "renewals.sweep_chunk", "renewals.sweep_totals",
                 "renewals.renew_user"):  # fmt: skip
        task = worker_app.tasks[name]
        assert task.time_limit in (None, worker_app.conf.task_time_limit), name
        assert task.soft_time_limit in (None, worker_app.conf.task_soft_time_limit), name
    assert worker_app.conf.task_time_limit < visibility


def test_a_redelivered_renew_user_replays_its_first_result(e2e: Celery) -> None:
    lapsed = datetime.now(UTC) - timedelta(days=40)
    call(e2e, "tokens.open_account", user_id="pro", tier="Professional", initial_balance=5,
         last_renewal_at=lapsed.isoformat())  # fmt: skip
    task_id = str(uuid.uuid4())
    kwargs = {"user_id": "pro"}
    first = e2e.send_task("renewals.renew_user", kwargs=kwargs, task_id=task_id).get(timeout=30)
    e2e.backend.forget(task_id)
    second = e2e.send_task("renewals.renew_user", kwargs=kwargs, task_id=task_id).get(timeout=30)
    assert first["success"] and first["tokens_added"] == 2000
    assert second == first
    assert call(e2e, "renewals.renew_user", user_id="pro")["error_code"] == "NOT_DUE"
    assert call(e2e, "tokens.get_balance", user_id="pro")["tokens_balance"] == 2005
    monthly = sql("SELECT count(*) FROM ledger_entries WHERE operation_type = 'monthly_reset'")
    assert monthly == [(1,)]


# --- the sweep fans out ------------------------------------------------------------------------

PLANNER_QUEUE = "renewals-planner-test"
PLANNER_CHUNK = 25


@pytest.fixture(scope="module")
def planner(workers: tuple[WorkerProcess, ...], app: Celery) -> Iterator[str]:
    """A worker serving only a private queue, planning sweeps in chunks of 25 users: a sweep sent
    there is planned by it, and its chunks run on the shared workers (w1, w2)."""
    worker = WorkerProcess(
        "planner",
        concurrency=1,
        env={"TOKENS_SWEEP_CHUNK_SIZE": str(PLANNER_CHUNK)},
        queues=PLANNER_QUEUE,
    )
    with running_workers(app, worker):
        yield PLANNER_QUEUE


def seed_due(n: int, prefix: str = "user-") -> None:
    sql(
        """
        INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, tokens_spent,
                              last_renewal_at, created_at, updated_at)
        SELECT :prefix || lpad(i::text, 4, '0'),
               (ARRAY['Gift', 'Professional', 'Business'])[1 + i % 3], 0, 0, 0,
               CASE WHEN i % 4 = 0 THEN NULL
                    ELSE now() - make_interval(days => 30 + i % 40, secs => i) END,
               now(), now()
        FROM generate_series(1, :n) AS i
        """,
        n=n,
        prefix=prefix,
    )


def renewal_counts() -> dict[int, int]:
    """How many users have 1, 2, ... monthly_reset entries."""
    rows = sql(
        "SELECT n, count(*) FROM (SELECT user_id, count(*) AS n FROM ledger_entries"
        " WHERE operation_type = 'monthly_reset' GROUP BY user_id) c GROUP BY n"
    )
    return {n: users for n, users in rows}


def test_the_sweep_fans_out_in_chunks_over_the_workers(e2e: Celery, planner: str) -> None:
    """Planned in chunks of 25, 300 due users renew on both workers; the contract's result
    comes back under the sweep's own task id."""
    seed_due(300)
    sql("INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, tokens_spent,"
        " last_renewal_at, created_at, updated_at)"
        " VALUES ('recent', 'Gift', 0, 0, 0, now(), now(), now())")  # fmt: skip
    before = tasks_done_by_worker(e2e, "renewals.sweep_chunk")
    sweep_id = str(uuid.uuid4())
    result = e2e.send_task("renewals.sweep", kwargs={}, task_id=sweep_id, queue=planner)
    assert result.get(timeout=120) == {
        "success": True,
        "total_processed": 300,
        "successful": 300,
        "failed": 0,
        "skipped": 0,
        "errors": [],
    }
    assert result.id == sweep_id
    assert workers_that_ran(e2e, "renewals.sweep_chunk", before) >= {"w1", "w2"}
    chunks = e2e.AsyncResult(f"{sweep_id}:0").get(timeout=10)
    assert chunks["successful"] == PLANNER_CHUNK
    assert renewal_counts() == {1: 300}
    assert call(e2e, "renewals.due")["user_ids"] == []
    assert call(e2e, "ledger.reconcile")["mismatches"] == []

    # Dry runs, tier and limit through the planner: the same counts the sweep returns.
    seed_due(90, prefix="more-")
    counts = {"success": True, "failed": 0, "skipped": 0, "errors": []}
    dry = e2e.send_task("renewals.sweep", kwargs={"dry_run": True, "tier": "Gift"}, queue=planner)
    assert dry.get(timeout=60) == {**counts, "total_processed": 30, "successful": 30}
    limited = e2e.send_task(
        "renewals.sweep", kwargs={"tier": "Gift", "limit": 27, "continue_on_error": False},
        queue=planner,
    )  # fmt: skip
    assert limited.get(timeout=60) == {**counts, "total_processed": 27, "successful": 27}
    assert len(call(e2e, "renewals.due", tier="Gift")["user_ids"]) == 3
    assert renewal_counts() == {1: 327}


def test_a_sweep_delivered_twice_renews_nobody_twice_and_reports_its_totals(
    e2e: Celery, planner: str
) -> None:
    """The same sweep message (same task id) delivered again, after the first finished and while
    it runs: it renews nobody again, and its result still says what the sweep did."""
    seed_due(200)
    sweep_id = str(uuid.uuid4())
    first = e2e.send_task("renewals.sweep", kwargs={}, task_id=sweep_id, queue=planner)
    totals = first.get(timeout=120)
    assert (totals["successful"], totals["total_processed"]) == (200, 200)
    e2e.backend.forget(sweep_id)
    again = e2e.send_task("renewals.sweep", kwargs={}, task_id=sweep_id, queue=planner)
    assert again.get(timeout=120) == totals
    assert renewal_counts() == {1: 200}

    seed_due(100, prefix="late-")
    sweep_id = str(uuid.uuid4())
    both = [
        e2e.send_task("renewals.sweep", kwargs={}, task_id=sweep_id, queue=q)
        for q in (planner, planner, "renewals")
    ]
    for r in both:
        assert r.get(timeout=120)["successful"] == 100
    assert renewal_counts() == {1: 300}
    assert call(e2e, "ledger.reconcile")["mismatches"] == []
