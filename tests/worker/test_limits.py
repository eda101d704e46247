"""No task outlives the visibility timeout: every registered task's time limits are checked when a
worker starts, and a worker with one at or past the timeout refuses to start."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
from celery import Celery

from tests.polling import wait_for
from tests.support import WorkerProcess
from worker.limits import backoff, backoff_cap
from worker.settings import Settings, get_settings


def task(name: str, soft: float | None = None, hard: float | None = None) -> SimpleNamespace:
    return SimpleNamespace(name=name, soft_time_limit=soft, time_limit=hard)


def test_every_registered_task_of_the_app_ends_before_redelivery() -> None:
    from worker.celery import app
    from worker.limits import time_limit_problems

    app.loader.import_default_modules()  # the task modules, as a worker imports them
    assert "renewals.sweep" in app.tasks and "tokens.debit" in app.tasks
    assert time_limit_problems(app.tasks.values(), visibility_timeout=300) == []


def test_a_limit_at_or_past_the_visibility_timeout_is_named() -> None:
    from worker.limits import time_limit_problems

    tasks = [
        task("ok", 100, 200),
        task("no-soft", None, 299.5),
        task("hard", 100, 300),
        task("soft", 400, 200),
        task("both", 500, 600),
        task("unlimited"),
    ]
    assert time_limit_problems(tasks, visibility_timeout=300) == [
        "hard: time_limit 300 s is not below the visibility timeout (300 s)",
        "soft: soft_time_limit 400 s is not below the visibility timeout (300 s)",
        "both: soft_time_limit 500 s is not below the visibility timeout (300 s)",
        "both: time_limit 600 s is not below the visibility timeout (300 s)",
        "unlimited: no time_limit; it must end before the visibility timeout (300 s)",
    ]


def test_worker_with_a_task_limit_past_the_visibility_timeout_refuses_to_start(
    app: Celery,
) -> None:
    # Any registered task is checked: here one loaded with a handler, limits 370 s / 400 s.
    handler = json.dumps(["tests.worker.long_task:on_completed"])
    w = WorkerProcess(
        f"limits-{os.getpid()}",
        concurrency=1,
        env={"TOKENS_OPERATION_COMPLETED_HANDLERS": handler},
    )
    w.log_path.write_text("")
    w.start()
    try:
        assert w.proc is not None
        proc = w.proc
        wait_for(lambda: proc.poll() is not None, 60, "the worker to refuse to start")
    finally:
        w.stop()
    assert w.proc.returncode != 0
    log = w.log_path.read_text()
    refusals = [ln for ln in log.splitlines() if "refusing to start" in ln]
    assert refusals == [
        "worker refusing to start: test.too_long: soft_time_limit 370 s is not below the "
        "visibility timeout (300 s); test.too_long: time_limit 400 s is not below the "
        "visibility timeout (300 s)"
    ]
    assert "ready." not in log
    assert not any(r for r in app.control.ping(timeout=0.5) if f"limits-{os.getpid()}@" in str(r))


# --- backoff --------------------------------------------------------------------------------


def test_backoff_is_jittered_exponential_and_capped() -> None:
    settings = get_settings()
    cap = backoff_cap()
    for retries in range(12):
        bound = min(cap, 0.5 * 2**retries)
        delays = [backoff(retries) for _ in range(200)]
        assert all(0 <= d <= bound for d in delays), retries
        assert len(set(delays)) > 1  # jitter: retries of many tasks do not stampede together
    assert max(backoff(30) for _ in range(200)) > cap / 2  # the cap, not the doubling, binds
    assert cap < settings.visibility_timeout


@pytest.mark.parametrize(
    ("visibility", "hard", "backoff_max", "cap"),
    [(300, 150, 30, 30), (300, 290, 30, 5), (10, 8, 30, 1)],
)
def test_a_retry_waits_and_runs_within_the_visibility_timeout(
    monkeypatch: pytest.MonkeyPatch, visibility: int, hard: int, backoff_max: int, cap: float
) -> None:
    settings = Settings(
        visibility_timeout=visibility,
        task_soft_time_limit=hard - 1,
        task_time_limit=hard,
        retry_backoff_max=backoff_max,
    )
    monkeypatch.setattr("worker.limits.get_settings", lambda: settings)
    assert backoff_cap() == cap
    # The longest wait plus the longest run ends before the message would be delivered again.
    assert max(backoff(40) for _ in range(500)) + hard < visibility
