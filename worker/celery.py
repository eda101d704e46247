"""The Celery app: ``celery -A worker worker`` finds ``worker.celery:app``."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import (
    celeryd_init,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)

from worker.config import celery_config
from worker.db import dispose_engines, reset_engines_after_fork
from worker.limits import time_limit_problems
from worker.queues import drop_stale_bindings
from worker.settings import get_settings
from worker.signals import connect_configured_handlers

TASK_MODULES = [
    "tasks.accounts",
    "tasks.movements",
    "tasks.ledger",
    "tasks.renewals",
    "tasks.reservations",
    "tasks.health",
    "tasks.maintenance",
]


def create_app() -> Celery:
    settings = get_settings()
    if not (settings.database_url and settings.broker_url and settings.result_backend):
        settings.var_dir.mkdir(parents=True, exist_ok=True)  # the embedded SQLite files live here
    app = Celery("tokens", include=TASK_MODULES)
    app.config_from_object(celery_config(settings))
    return app


app = create_app()
connect_configured_handlers()


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _after_fork(**_: Any) -> None:
    # A forked child must not share the parent's pooled connections.
    reset_engines_after_fork()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _on_child_exit(**_: Any) -> None:
    dispose_engines()


@worker_init.connect  # type: ignore[untyped-decorator]
def _check_time_limits(sender: Any, **_: Any) -> None:
    # Before the pool starts or the broker is reached; SystemExit passes through Celery's signal
    # dispatch (which logs and swallows exceptions) and ends the command with status 1 and this
    # one line on stderr.
    problems = time_limit_problems(sender.app.tasks.values(), get_settings().visibility_timeout)
    if problems:
        raise SystemExit("worker refusing to start: " + "; ".join(problems))


@celeryd_init.connect  # type: ignore[untyped-decorator]
def _guard_the_transport(conf: Any, **_: Any) -> None:
    # A worker reads Redis through kombu's transport made to refuse envelopes it would stop on
    # (worker/transport.py). Set for workers only: other processes (producers, beat, Flower,
    # whose broker page parses the transport name as a URL scheme) keep kombu's own.
    if get_settings().broker_is_redis:
        conf.broker_transport = "worker.transport:Transport"


@worker_ready.connect  # type: ignore[untyped-decorator]
def _drop_stale_bindings(**_: Any) -> None:
    # Bindings live in Redis, not in the code: one an earlier release declared would go on
    # copying default-queue messages to `renewals` (worker/queues.py).
    settings = get_settings()
    if settings.broker_is_redis:
        drop_stale_bindings(settings.broker)
