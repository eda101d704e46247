"""worker/logs.py through a real worker: one line per task outcome (JSON by default with servers,
or text), no result reprs, no passwords, a final failure's traceback as one escaped field."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.polling import wait_for
from tests.support import WorkerProcess, running_workers
from worker.migrate import upgrade
from worker.settings import get_settings

PASSWORD = f"pw-{uuid.uuid4().hex}"
DEBIT = {"user_id": "alice", "amount": 10, "operation_type": "image_generation"}
# What Celery itself prints to the console, outside logging: the superuser warning (the tests run
# as root) and the shutdown notice.
CONSOLE = (
    "SecurityWarning",
    "absolutely not recommended",
    "Please specify a different user",
    "User information: uid=",
    "_warn_or_raise_security_error",
    "worker: Warm shutdown",
)


@pytest.fixture
def database() -> Iterator[str]:
    """A migrated database of this test's own, so it can break it."""
    url = make_url(get_settings().db_url)
    name = f"tokens_logs_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        own = url.set(database=name).render_as_string(hide_password=False)
        upgrade(own)
        yield own
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def with_password(url: str) -> str:
    return url.replace("://", f"://default:{PASSWORD}@", 1)


def execute(database: str, sql: str) -> None:
    engine = create_engine(database)
    try:
        with engine.begin() as conn:
            conn.execute(text(sql))
    finally:
        engine.dispose()


def run_operations(app: Celery, worker: WorkerProcess, database: str, queue: str) -> dict[str, str]:
    """A debit, its replay, a refusal, a validation error, a task of Celery's own, and a debit
    that fails (its table gone); returns their task ids."""
    ids: dict[str, str] = {}

    def send(name: str, case: str, **options: Any) -> Any:
        result = app.send_task(name, queue=queue, **options)
        ids[case] = result.id
        return result

    with running_workers(app, worker):
        opened = send("tokens.open_account", "open", kwargs={"user_id": "alice"})
        assert opened.get(timeout=30)["created"] is True
        execute(database, "UPDATE accounts SET tokens_balance = 100 WHERE user_id = 'alice'")
        keyed = DEBIT | {"idempotency_key": "k1"}
        assert send("tokens.debit", "debit", kwargs=keyed).get(timeout=30)["new_balance"] == 90
        assert send("tokens.debit", "replay", kwargs=keyed).get(timeout=30)["replayed"] is True
        refused = send("tokens.debit", "refusal", kwargs=DEBIT | {"amount": 1000})
        assert refused.get(timeout=30)["error_code"] == "INSUFFICIENT_TOKENS"
        invalid = send("tokens.debit", "invalid", kwargs=DEBIT | {"amount": "10"})
        assert invalid.get(timeout=30)["error_code"] == "VALIDATION_ERROR"
        own = send("celery.accumulate", "celery", args=[{"kept": "out-of-the-log"}])
        assert own.get(timeout=30) == [{"kept": "out-of-the-log"}]
        execute(database, "ALTER TABLE accounts RENAME TO accounts_gone")
        failed = send("tokens.debit", "failure", kwargs=DEBIT)
        wait_for(lambda: failed.state == "FAILURE", 30, "the debit to fail")
        # The state is stored before the pool process has finished with the task: stopping the
        # worker then would kill it mid-task and log a WorkerLostError traceback of our making.
        wait_for(lambda: idle(app, worker), 30, "the worker to finish its last task")
    return ids


def idle(app: Celery, worker: WorkerProcess) -> bool:
    active = app.control.inspect(timeout=1).active() or {}
    mine = [tasks for node, tasks in active.items() if node.startswith(f"{worker.name}@")]
    return mine == [[]]


def worker_for(name: str, database: str, log: Path, queue: str, **env: str) -> WorkerProcess:
    settings = get_settings()
    servers = {
        # postgres:// as a hosting panel prints it: read as postgresql+psycopg://
        "TOKENS_DATABASE_URL": make_url(database)
        .set(drivername="postgres", password=PASSWORD)
        .render_as_string(hide_password=False),
        "TOKENS_BROKER_URL": with_password(settings.broker),
        "TOKENS_RESULT_BACKEND": with_password(settings.backend),
    }
    return WorkerProcess(
        f"{name}-{os.getpid()}", concurrency=1, env=servers | env, queues=queue, log_path=log
    )


def test_one_json_line_per_outcome_without_results_or_passwords(
    app: Celery, database: str, tmp_path: Path
) -> None:
    log = tmp_path / "worker.log"
    queue = f"logs-{uuid.uuid4().hex[:8]}"
    ids = run_operations(app, worker_for("logs-json", database, log, queue), database, queue)

    text_log = log.read_text()
    assert PASSWORD not in text_log
    records = []
    for line in text_log.splitlines():
        if line.strip() and not any(part in line for part in CONSOLE):
            records.append(json.loads(line))  # every log line is one JSON object
    assert "new_balance" not in text_log and "balance_before" not in text_log
    assert "out-of-the-log" not in text_log

    def outcome(case: str) -> dict[str, Any]:
        [record] = [r for r in records if r.get("task_id") == ids[case]]
        mentions = [r for r in records if ids[case] in json.dumps(r)]
        # Celery's "received", then ours: its "succeeded in …: <result>" / traceback lines are gone.
        assert [r["message"] for r in mentions] == [
            f"Task {record['task']}[{ids[case]}] received",
            record["message"],
        ]
        assert record["logger"] == "tokens.operations"
        assert record["duration_ms"] > 0
        assert record["time"].endswith("+00:00")
        return {k: v for k, v in record.items() if k not in ("time", "duration_ms", "process")}

    fields = {"task": "tokens.debit", "operation_type": "image_generation", "user_id": "alice"}
    assert outcome("debit") == fields | {
        "level": "INFO",
        "logger": "tokens.operations",
        "message": f"tokens.debit[{ids['debit']}] ok",
        "task_id": ids["debit"],
        "amount": -10,
        "outcome": "ok",
        "replayed": False,
    }
    assert outcome("replay")["replayed"] is True
    assert outcome("refusal") == fields | {
        "level": "INFO",
        "logger": "tokens.operations",
        "message": f"tokens.debit[{ids['refusal']}] INSUFFICIENT_TOKENS",
        "task_id": ids["refusal"],
        "amount": 1000,
        "outcome": "INSUFFICIENT_TOKENS",
        "replayed": False,
        "error": "Insufficient tokens. Required: 1000, Available: 90",
    }
    assert outcome("invalid") == fields | {
        "level": "INFO",
        "logger": "tokens.operations",
        "message": f"tokens.debit[{ids['invalid']}] VALIDATION_ERROR",
        "task_id": ids["invalid"],
        "amount": None,
        "outcome": "VALIDATION_ERROR",
        "replayed": False,
        "error": "Invalid arguments: amount: Input should be a valid integer",
    }
    failure = outcome("failure")
    traceback = failure.pop("exc_info")
    assert failure == fields | {
        "level": "ERROR",
        "logger": "tokens.operations",
        "message": f"tokens.debit[{ids['failure']}] DATABASE_ERROR",
        "task_id": ids["failure"],
        "amount": 10,
        "outcome": "DATABASE_ERROR",
        "replayed": False,
        "error": failure["error"],
    }
    assert failure["error"].startswith("ProgrammingError: (psycopg.errors.UndefinedTable)")
    # The traceback: one escaped field of the same line.
    assert traceback.startswith("Traceback (most recent call last):")
    assert "UndefinedTable" in traceback and traceback.count("\n") > 10

    # Celery's own task: its line keeps the run time, not the result.
    [celery_line] = [
        r for r in records if ids["celery"] in r["message"] and "succeeded" in r["message"]
    ]
    assert celery_line["message"].startswith(
        f"Task celery.accumulate[{ids['celery']}] succeeded in "
    )
    assert celery_line["message"].endswith("s")
    [start] = [r for r in records if r["message"].endswith(" starting")]
    assert start["transport"] == with_password(get_settings().broker).replace(PASSWORD, "***")
    assert start["queues"] == [queue]


def test_text_logs_are_one_line_per_outcome(app: Celery, database: str, tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    queue = f"logs-{uuid.uuid4().hex[:8]}"
    w = worker_for("logs-text", database, log, queue, TOKENS_LOG_FORMAT="text")
    ids = run_operations(app, w, database, queue)

    text_log = log.read_text()
    assert PASSWORD not in text_log
    assert "new_balance" not in text_log and "out-of-the-log" not in text_log
    assert "Traceback" not in text_log  # at INFO; -l DEBUG adds it as a record of its own

    def line(case: str) -> str:
        [found] = [ln for ln in text_log.splitlines() if ids[case] in ln and "received" not in ln]
        return found

    assert line("debit").endswith(
        f'tokens.debit[{ids["debit"]}] ok user_id="alice" operation_type="image_generation" '
        f"amount=-10 replayed=false duration_ms={line('debit').rsplit('=', 1)[1]}"
    )
    assert (
        f'tokens.debit[{ids["refusal"]}] INSUFFICIENT_TOKENS user_id="alice" '
        'operation_type="image_generation" amount=1000 replayed=false duration_ms='
    ) in line("refusal")
    assert line("refusal").endswith('error="Insufficient tokens. Required: 1000, Available: 90"')
    assert "ERROR" in line("failure") and "DATABASE_ERROR" in line("failure")
    assert 'error="ProgrammingError: (psycopg.errors.UndefinedTable)' in line("failure")


def test_a_field_the_signal_gains_later_is_left_out() -> None:
    from worker.logs import operation_fields

    sent = {"operation": "tokens.debit", "task_id": "t", "success": True, "duration": 0.5}
    assert operation_fields(sent | {"queue_wait": 2.0}) == {
        "task_id": "t",
        "task": "tokens.debit",
        "operation_type": None,
        "user_id": None,
        "amount": None,
        "outcome": "ok",
        "replayed": False,
        "duration_ms": 500.0,
    }
