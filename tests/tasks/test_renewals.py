"""renewals.* through real worker processes: the contract's shapes, and the race."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery
from sqlalchemy import text

from tests.polling import wait_for
from tests.support import call
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


def waiting_for_locks() -> int:
    # A fresh connection each time: pg_stat_activity is a snapshot for a whole transaction.
    with get_engine().connect() as conn:
        waiting: int = conn.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
        ).scalar_one()
        return waiting


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
        wait_for(lambda: waiting_for_locks() >= 4, 60, "every worker child blocked")
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


def test_the_sweep_runs_under_the_general_time_limits_unless_given_its_own() -> None:
    # TOKENS_SWEEP_TIME_LIMIT, when set, gives the sweep limits of its own; like every task's,
    # they must stay below the visibility timeout (a worker refuses to start otherwise:
    # tests/worker/test_limits.py).
    from tasks.movements import debit
    from tasks.renewals import sweep
    from worker.settings import get_settings

    assert get_settings().sweep_time_limit is None
    conf = worker_app.conf
    assert (sweep.soft_time_limit, sweep.time_limit) == (
        conf.task_soft_time_limit,
        conf.task_time_limit,
    )
    assert debit.time_limit == conf.task_time_limit
