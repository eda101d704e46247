"""Faults through real worker processes, no mocks: the database goes away and comes back, a
worker is killed in the middle of a debit, one message is delivered twice at once.

Each dedicated worker consumes a queue of its own, so the session's workers never take its tasks.
"""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import text
from sqlalchemy.engine import make_url

from accounting.accounts import open_account
from tests import dbstate
from tests.polling import wait_for
from tests.support import WorkerProcess, running_workers
from tests.worker.tcp_proxy import TcpProxy
from worker.db import get_engine, session_scope
from worker.settings import get_settings

DEBIT = {"user_id": "u", "amount": 10, "operation_type": "image_generation"}
# Redelivery after 10 s instead of 300; the time limits must stay below it.
FAST_REDELIVERY = {
    "TOKENS_VISIBILITY_TIMEOUT": "10",
    "TOKENS_TASK_SOFT_TIME_LIMIT": "5",
    "TOKENS_TASK_TIME_LIMIT": "8",
}


@pytest.fixture
def queue() -> str:
    return f"faults-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def account(clean_db: None) -> str:
    with session_scope() as session:
        open_account(session, "u", initial_balance=100)
    return "u"


def worker(role: str, queue: str, env: dict[str, str]) -> WorkerProcess:
    return WorkerProcess(f"{role}-{os.getpid()}", concurrency=1, env=env, queues=queue)


def log_of(w: WorkerProcess) -> str:
    return Path(w.log_path).read_text(errors="replace")


def _pids(sql: str) -> list[int]:
    with get_engine().connect() as conn:
        return [int(p) for p in conn.execute(text(sql)).scalars()]


def lock_waiters() -> list[int]:
    """Backends of the test database blocked on a lock."""
    return _pids(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    )


def busy_backends() -> list[int]:
    """Backends of the test database running a statement or inside a transaction."""
    return _pids(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        " AND state IN ('active', 'idle in transaction', 'idle in transaction (aborted)')"
    )


def backend_alive(pid: int) -> bool:
    return pid in _pids("SELECT pid FROM pg_stat_activity")


@contextmanager
def row_locked(user_id: str) -> Iterator[None]:
    """Hold the account row's lock (SELECT ... FOR UPDATE) until the block ends."""
    with get_engine().connect() as conn:
        conn.execute(
            text("SELECT 1 FROM accounts WHERE user_id = :u FOR UPDATE"), {"u": user_id}
        ).one()
        try:
            yield
        finally:
            conn.rollback()


def applied_once(user_id: str, task_id: str, amount: int) -> None:
    debits = [e for e in dbstate.entries(user_id) if e["tokens_amount"] < 0]
    assert len(debits) == 1
    assert (debits[0]["tokens_amount"], debits[0]["idempotency_key"]) == (-amount, task_id)
    assert dbstate.balance(user_id) == 100 - amount


# --- the database goes away -----------------------------------------------------------------


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    url = make_url(get_settings().db_url)
    p = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        yield p
    finally:
        p.close()


def test_database_outage_is_retried_then_fails_or_succeeds_once(
    app: Celery, account: str, queue: str, proxy: TcpProxy
) -> None:
    through_proxy = make_url(get_settings().db_url).set(host="127.0.0.1", port=proxy.port)
    env = {
        "TOKENS_DATABASE_URL": through_proxy.render_as_string(hide_password=False),
        "TOKENS_TASK_MAX_RETRIES": "3",
        "TOKENS_RETRY_BACKOFF_MAX": "1",
    }
    w = worker("faults-outage", queue, env)
    proxy.open()  # a worker checks its database before it says ready
    with running_workers(app, w):
        proxy.shut()
        # Down for longer than every retry: an infrastructure FAILURE, nothing written.
        doomed = app.send_task("tokens.debit", kwargs=DEBIT, queue=queue)
        wait_for(lambda: doomed.state == "FAILURE", 30, "FAILURE after the last retry")
        assert dbstate.balance("u") == 100

        # Down, then back while the task is waiting to retry: it completes, once.
        result = app.send_task("tokens.debit", kwargs=DEBIT, queue=queue)
        wait_for(lambda: result.state == "RETRY", 15, "the debit waiting to retry")
        proxy.open()
        out = result.get(timeout=30)
    assert (out["success"], out["new_balance"], out["replayed"]) == (True, 90, False)
    applied_once("u", result.id, 10)
    assert proxy.refused >= 5  # 4 attempts of the first debit, at least 1 of the second
    log = log_of(w)
    assert log.count(f"tokens.debit[{doomed.id}]: transient database error, retry") == 3
    assert f"tokens.debit[{doomed.id}]: giving up after 3 retries" in log
    assert f"tokens.debit[{result.id}]: transient database error, retry 1" in log
    assert f"tokens.debit[{result.id}] ok" in log


# --- a worker dies holding a debit ----------------------------------------------------------


def test_debit_held_by_a_killed_worker_is_redelivered_and_applied_once(
    app: Celery, account: str, queue: str
) -> None:
    """The worker dies while its debit waits for the account's lock. The debit runs alone (one
    statement in autocommit: no COMMIT is left to miss), so the orphaned backend applies it once
    the lock is free and only then finds its client gone; the redelivered message replays that
    outcome under the task id. Without the key it would be applied twice."""
    first = worker("faults-crash-a", queue, FAST_REDELIVERY)
    with row_locked("u"), running_workers(app, first):
        result = app.send_task("tokens.debit", kwargs=DEBIT, queue=queue)
        [orphan] = wait_for(lock_waiters, 10, "the debit blocked on the row lock")
        first.kill()  # the whole process group, its statement waiting for the lock
    wait_for(lambda: not backend_alive(orphan), 10, "the orphaned backend to end")
    applied_once("u", result.id, 10)

    second = worker("faults-crash-b", queue, FAST_REDELIVERY)
    with running_workers(app, second):
        out = result.get(timeout=40)  # redelivered once the visibility timeout has passed
    assert (out["success"], out["new_balance"], out["replayed"]) == (True, 90, True)
    assert f"tokens.debit[{result.id}] ok" in log_of(second)
    applied_once("u", result.id, 10)


def children_of(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_debit_whose_pool_process_dies_is_requeued_and_applied_once(
    app: Celery, account: str, queue: str
) -> None:
    # Default visibility timeout (300 s): only task_reject_on_worker_lost brings it back quickly.
    w = worker("faults-child", queue, {})
    with running_workers(app, w):
        with row_locked("u"):
            result = app.send_task("tokens.debit", kwargs=DEBIT, queue=queue)
            wait_for(lock_waiters, 10, "the debit blocked on the row lock")
            assert w.proc is not None
            [child] = children_of(w.proc.pid)
            os.kill(child, signal.SIGKILL)
            # Requeued and started again in a fresh pool process: it waits on the key the dead
            # one claimed, which waits on our lock.
            wait_for(lambda: len(lock_waiters()) == 2, 20, "the requeued debit to block too")
        out = result.get(timeout=30)
    # The dead process's statement, alone in autocommit, completes once our lock is gone; the
    # requeued one then finds its key answered and replays it.
    assert (out["success"], out["new_balance"], out["replayed"]) == (True, 90, True)
    applied_once("u", result.id, 10)
    assert "WorkerLostError" in log_of(w)


# --- one message, two deliveries at once ----------------------------------------------------


def test_one_message_delivered_twice_at_once_applies_once(e2e: Celery) -> None:
    with session_scope() as session:
        open_account(session, "u", initial_balance=100)
    task_id = str(uuid.uuid4())
    with row_locked("u"):
        for _ in range(2):
            e2e.send_task("tokens.debit", kwargs=DEBIT, task_id=task_id)
        wait_for(lambda: len(lock_waiters()) == 2, 15, "both deliveries blocked")
    wait_for(lambda: not busy_backends(), 15, "both deliveries to finish")
    out = e2e.AsyncResult(task_id).get(timeout=30)
    assert (out["success"], out["new_balance"]) == (True, 90)
    applied_once("u", task_id, 10)
    with get_engine().connect() as conn:
        keys = conn.execute(text("SELECT count(*) FROM idempotency_records")).scalar_one()
    assert keys == 1


# --- a time limit while the debit waits --------------------------------------------------------


def sink_events(sink: Path) -> list[dict[str, Any]]:
    if not sink.exists():
        return []
    return [json.loads(line) for line in sink.read_text().splitlines()]


def signal_env(sink: Path) -> dict[str, str]:
    """A worker's environment connecting the operation signals to the sink file."""
    return {
        "TOKENS_TEST_SIGNAL_SINK": str(sink),
        "TOKENS_OPERATION_COMPLETED_HANDLERS": json.dumps(
            ["tests.worker.signal_sink:on_operation_completed"]
        ),
        "TOKENS_OPERATION_RETRIED_HANDLERS": json.dumps(
            ["tests.worker.signal_sink:on_operation_retried"]
        ),
    }


def test_soft_time_limit_on_a_lock_wait_fails_once_and_changes_nothing(
    app: Celery, account: str, queue: str, tmp_path: Path
) -> None:
    sink = tmp_path / "signals.jsonl"
    env = {
        "TOKENS_VISIBILITY_TIMEOUT": "10",
        "TOKENS_TASK_SOFT_TIME_LIMIT": "2",
        "TOKENS_TASK_TIME_LIMIT": "4",
        "TOKENS_RETRY_BACKOFF_MAX": "1",
        **signal_env(sink),
    }
    w = worker("faults-time-limit", queue, env)
    with running_workers(app, w):
        with row_locked("u"):
            result = app.send_task("tokens.debit", kwargs=DEBIT, queue=queue)
            wait_for(lock_waiters, 10, "the debit blocked on the row lock")
            wait_for(lambda: result.state != "PENDING", 15, "the soft time limit")
            # The interrupted statement was cancelled and its connection closed: nothing waits
            # on our lock any more, though we still hold it.
            wait_for(lambda: not lock_waiters(), 5, "the interrupted statement to go away")
            assert result.state == "FAILURE"
        time.sleep(3)  # a retry, or a statement left running, would now take the lock and apply
        assert result.state == "FAILURE"
    assert type(result.result).__name__ == "SoftTimeLimitExceeded"
    assert dbstate.balance("u") == 100
    assert len(dbstate.entries("u")) == 1  # the opening entry only
    log = log_of(w)
    assert log.count(f"Task tokens.debit[{result.id}] received") == 1
    assert "transient database error" not in log
    [done] = sink_events(sink)
    assert (done["signal"], done["operation"], done["success"]) == (
        "operation_completed",
        "tokens.debit",
        False,
    )
    assert done["error_code"] == "TIME_LIMIT_EXCEEDED"
    assert "SoftTimeLimitExceeded" in done["error"]


# --- one operation_completed per outcome, retries apart -----------------------------------------


def test_retries_are_reported_apart_from_the_one_outcome(
    app: Celery, account: str, queue: str, proxy: TcpProxy, tmp_path: Path
) -> None:
    sink = tmp_path / "signals.jsonl"
    through_proxy = make_url(get_settings().db_url).set(host="127.0.0.1", port=proxy.port)
    env = {
        "TOKENS_DATABASE_URL": through_proxy.render_as_string(hide_password=False),
        "TOKENS_TASK_MAX_RETRIES": "2",
        "TOKENS_RETRY_BACKOFF_MAX": "1",
        **signal_env(sink),
    }
    w = worker("faults-signals", queue, env)
    proxy.open()  # a worker checks its database before it says ready
    with running_workers(app, w):
        proxy.shut()
        doomed = app.send_task("tokens.debit", kwargs=DEBIT, queue=queue)
        wait_for(lambda: doomed.state == "FAILURE", 30, "FAILURE after the last retry")
        result = app.send_task("tokens.debit", kwargs=DEBIT, queue=queue)
        wait_for(lambda: result.state == "RETRY", 15, "the debit waiting to retry")
        proxy.open()
        assert result.get(timeout=30)["success"] is True
    events = sink_events(sink)
    retried = [e for e in events if e["signal"] == "operation_retried"]
    completed = [e for e in events if e["signal"] == "operation_completed"]
    assert [(e["task_id"], e["attempt"]) for e in retried if e["task_id"] == doomed.id] == [
        (doomed.id, 1),
        (doomed.id, 2),
    ]
    assert all(
        e["operation"] == "tokens.debit" and "OperationalError" in e["error"] for e in retried
    )
    assert [e["attempt"] for e in retried if e["task_id"] == result.id][:1] == [1]
    # Exactly two outcomes: the doomed debit's failure, then the recovered debit's success.
    assert [(e["success"], e["error_code"]) for e in completed] == [
        (False, "DATABASE_ERROR"),
        (True, None),
    ]
    assert "OperationalError" in completed[0]["error"]
    assert (completed[0]["user_id"], completed[0]["amount"]) == ("u", 10)
    assert completed[1]["amount"] == -10
