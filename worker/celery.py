"""The Celery app: ``celery -A worker worker`` finds ``worker.celery:app``."""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import (
    celeryd_init,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
)
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

import worker.logs  # noqa: F401  (connects the logging hooks)
from accounting import months
from token_worker_client.signing import sign_messages
from worker import coalescer, relay
from worker.config import celery_config
from worker.db import dispose_engines, make_engine, reset_engines_after_fork
from worker.limits import time_limit_problems
from worker.preflight import start_problems
from worker.producers import Producers, unmatched_patterns
from worker.queues import drop_stale_bindings
from worker.settings import ConfigurationError, get_settings
from worker.signals import connect_configured_handlers

log = logging.getLogger(__name__)

TASK_MODULES = [
    "tasks.accounts",
    "tasks.movements",
    "tasks.ledger",
    "tasks.renewals",
    "tasks.reservations",
    "tasks.health",
    "tasks.maintenance",
    "tasks.events",
]


def create_app() -> Celery:
    try:
        settings = get_settings()
    except ConfigurationError as exc:
        # Raised while `celery -A worker …` imports the app: SystemExit is the one exception
        # Celery's command line does not turn into a traceback. One line, status 1.
        raise SystemExit(f"configuration error: {exc}") from None
    if not (settings.database_url and settings.broker_url and settings.result_backend):
        settings.var_dir.mkdir(
            parents=True, exist_ok=True
        )  # the embedded servers keep their data here
    app = Celery("tokens", include=TASK_MODULES)
    app.config_from_object(celery_config(settings))
    if settings.producers is not None:
        # What the worker, its beat and `tokens` publish is signed (worker/producers.py).
        sign_messages(app, Producers(settings.producers).signer(settings.producer_name))
    # The single-debit coalescer's thread; it runs only with TOKENS_COALESCE_MS > 0.
    app.steps["worker"].add(coalescer.Step)
    # The events relay's thread; it runs only with a push channel configured (worker/relay.py).
    app.steps["worker"].add(relay.Step)
    return app


app = create_app()
try:
    connect_configured_handlers()
except ConfigurationError as exc:
    raise SystemExit(f"configuration error: {exc}") from None


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _after_fork(**_: Any) -> None:
    # A forked child must not share the parent's pooled connections.
    reset_engines_after_fork()
    # What the child holds now (modules, the app, the parent's heap) lives as long as it does.
    # Frozen, it is out of the collector's way: a full collection then scans only what tasks
    # made since, instead of pausing a task ~60 ms over some 130,000 objects.
    gc.freeze()


@worker_process_shutdown.connect  # type: ignore[untyped-decorator]
def _on_child_exit(**_: Any) -> None:
    dispose_engines()


@celeryd_init.connect  # type: ignore[untyped-decorator]
def _check_before_start(instance: Any, **_: Any) -> None:
    # The first thing a worker does (the task modules are imported), before the pool starts,
    # the consumer connects or the worker says ready. SystemExit passes through Celery's signal
    # dispatch (which logs and swallows exceptions) and ends the command with status 1 and this
    # one line on stderr. A worker that cannot reach its database (or finds it unmigrated), its
    # broker or its result backend would otherwise say ready and fail every task.
    settings = get_settings()
    problems = time_limit_problems(instance.app.tasks.values(), settings.visibility_timeout)
    if not problems and settings.producers is not None:
        problems = unmatched_patterns(settings.producers, instance.app.tasks.keys())
    if not problems:
        problems = start_problems()
    if problems:
        raise SystemExit("worker refusing to start: " + "; ".join(problems))


@worker_init.connect  # type: ignore[untyped-decorator]
def _serve_metrics(sender: Any, **_: Any) -> None:
    # In the main process, before the pool forks (the children inherit the directory) and before
    # prometheus_client is first imported: it chooses per-process files or memory at import.
    settings = get_settings()
    if settings.metrics_port is None:
        return
    node = re.sub(r"[^A-Za-z0-9@._-]", "_", sender.hostname)
    directory = settings.metrics_dir or settings.var_dir / "metrics" / node
    directory.mkdir(parents=True, exist_ok=True)
    for stale in Path(directory).glob("*.db"):  # the previous run's processes
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    if "prometheus_client.values" in sys.modules:
        # Imported already (Celery loads its command plugins first, and Flower's imports
        # prometheus_client): it picked in-memory values at import. Metrics look the class up
        # when they are made, so choosing again now, before ours exist, gives per-process files.
        from prometheus_client import values

        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    from worker import metrics

    try:
        metrics.start(sender.app, directory, queues=list(sender.app.amqp.queues.consume_from))
    except OSError as exc:
        raise SystemExit(
            f"worker refusing to start: metrics port {settings.metrics_addr}:"
            f"{settings.metrics_port}: {exc.strerror or exc}"
        ) from None


@celeryd_init.connect  # type: ignore[untyped-decorator]
def _guard_the_transport(conf: Any, **_: Any) -> None:
    # A worker reads Redis (RabbitMQ) through kombu's transport made to refuse envelopes it would
    # stop on (bodies it would inflate) (worker/transport.py). Set for workers only: other
    # processes (producers, beat, Flower, whose broker page parses the transport name as a URL
    # scheme) keep kombu's own.
    settings = get_settings()
    if settings.broker_is_redis:
        conf.broker_transport = "worker.transport:Transport"
    elif settings.broker_is_amqp:
        conf.broker_transport = "worker.transport:AmqpTransport"


@worker_ready.connect  # type: ignore[untyped-decorator]
def _drop_stale_bindings(**_: Any) -> None:
    # Bindings live in Redis, not in the code: one an earlier release declared would go on
    # copying default-queue messages to `renewals` (worker/queues.py).
    settings = get_settings()
    if settings.broker_is_redis:
        drop_stale_bindings(settings.broker)


@worker_ready.connect  # type: ignore[untyped-decorator]
def _make_months(**_: Any) -> None:
    # The ledger's months ahead (beat makes them daily too): a worker started after weeks
    # without beat finds them made. Failing (a lock held long elsewhere) only defers it. On an
    # engine of its own, closed after: no connection of it stays in this process's pool, which
    # the coalescer and the relay use.
    engine = make_engine(get_settings().db_url)
    try:
        with Session(engine) as session, session.begin():
            made = months.make_months(session)
    except SQLAlchemyError as exc:
        log.warning("ledger months not made now: %s", exc.__class__.__name__)
        return
    finally:
        engine.dispose()
    if made:
        log.info("ledger months made: %s", ", ".join(made))
