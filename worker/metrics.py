"""Prometheus metrics of a worker, in prometheus_client's multiprocess mode.

Every process of a prefork worker (the main process and each pool child) writes its samples to
files of its own in one directory (``PROMETHEUS_MULTIPROC_DIR``); the main process serves them
all, merged, on ``TOKENS_METRICS_PORT`` (one server per worker, on loopback unless
``TOKENS_METRICS_ADDR`` says otherwise, bounded: worker/listener.py). prometheus_client chooses its
storage (files or memory) when it is first imported, so this module is imported only once
worker/celery.py has set that directory, at ``worker_init`` in the main process, before the
pool forks; the children inherit it.

What feeds what, all in handlers of signals the worker sends anyway (a few counter increments
per task, no database work):

- ``operation_completed`` (every contract task's outcome, in the pool child; in the main process
  for a hard time limit): ``tokens_operations_total``, ``tokens_task_duration_seconds``,
  ``tokens_replays_total`` and ``tokens_moved_total`` (movements that applied);
- ``renewals_counted`` (the domain's event, after a renewal commits): ``tokens_renewals_total``
  and the renewals' share of ``tokens_moved_total``;
- ``grants_expired`` (the domain's event, after an expiry commits: ``grants.expire`` chunks and
  the expiries movements and reads write first): ``tokens_expired_total``,
  ``tokens_grants_expired_total`` and the expiries' share of ``tokens_moved_total``;
- ``operation_retried``, ``message_refused`` (main process);
- Celery's task signals: ``celery_task_*`` as celery-exporter names them, and the results of
  ``tokens.debit_batch`` and ``ledger.reconcile`` (``task_success``);
- on each scrape, in the main process: queue lengths from the broker, and from the database the
  reservations held and the latest sweep's progress (:class:`ScrapeCollector`), each bounded by
  a timeout. Read rather than counted, they survive a worker's restart and agree across
  workers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import (
    after_task_publish,
    task_failure,
    task_postrun,
    task_prerun,
    task_received,
    task_retry,
    task_success,
    worker_process_init,
    worker_process_shutdown,
)
from kombu.exceptions import ChannelError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from accounting import grants, renewals, reservations
from accounting.events import grants_expired, renewals_counted
from accounting.grants import EXPIRY
from worker.failures import one_line
from worker.listener import MetricsServer, serve
from worker.poison import REASONS
from worker.settings import get_settings
from worker.signals import message_refused, operation_completed, operation_retried

log = logging.getLogger(__name__)

# --- the metrics --------------------------------------------------------------------------------
# Not registered anywhere: in multiprocess mode the server reads every process's files.

OPERATIONS = Counter(
    "tokens_operations",
    "Contract task outcomes: outcome is ok or the error code (a replay is ok).",
    ["task", "operation_type", "outcome"],
    registry=None,
)
REPLAYS = Counter(
    "tokens_replays",
    "Successful outcomes that replayed an earlier identical request (nothing applied again).",
    ["task", "operation_type"],
    registry=None,
)
MOVED = Counter(
    "tokens_moved",
    "Tokens moved by movements that applied (replays excluded), by sign: credit or debit.",
    ["operation_type", "direction"],
    registry=None,
)
BATCH_ITEMS = Counter(
    "tokens_batch_items",
    "Items of tokens.debit_batch by outcome (ok or the error code).",
    ["operation_type", "outcome"],
    registry=None,
)
RETRIES = Counter(
    "tokens_operation_retries",
    "Attempts that failed with a transient database error and will run again.",
    ["task"],
    registry=None,
)
RENEWALS = Counter(
    "tokens_renewals",
    "Users renewed, skipped or failed by sweeps and renew_user. tier is the account's for"
    " renewed; for skipped and failed, the sweep's tier, or all when it swept every tier.",
    ["tier", "outcome"],
    registry=None,
)
EXPIRED_TOKENS = Counter(
    "tokens_expired",
    "Tokens that left balances through expiry entries (what was left of due grants, less holds).",
    registry=None,
)
EXPIRED_GRANTS = Counter(
    "tokens_grants_expired",
    "Expiry entries written: one per grant whose unheld remaining expired.",
    registry=None,
)
REFUSED = Counter(
    "tokens_messages_refused",
    "Messages refused before any task saw them (poison messages), by reason.",
    ["reason"],
    registry=None,
)
DURATION = Histogram(
    "tokens_task_duration_seconds",
    "Time a contract task took, from validation to its committed outcome.",
    ["task"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 150),
    registry=None,
)
RECONCILE_MISMATCHES = Gauge(
    "tokens_reconcile_mismatches",
    "Users whose balance differed from their ledger at the last full ledger.reconcile"
    " (at most 1000 are counted, as the task lists at most 1000).",
    registry=None,
    multiprocess_mode="mostrecent",
)
LAST_RECONCILE = Gauge(
    "tokens_last_reconcile_timestamp_seconds",
    "When the last full ledger.reconcile finished (Unix time).",
    registry=None,
    multiprocess_mode="mostrecent",
)

# celery-exporter's names (worker-side: what this worker received, started, sent...).
_TASK = ["name", "queue_name"]
SENT = Counter("celery_task_sent", "Tasks this worker published.", _TASK, registry=None)
RECEIVED = Counter("celery_task_received", "Tasks this worker received.", _TASK, registry=None)
STARTED = Counter("celery_task_started", "Tasks a pool process started.", _TASK, registry=None)
SUCCEEDED = Counter(
    "celery_task_succeeded",
    "Tasks that returned (a business refusal too: it is a result).",
    _TASK,
    registry=None,
)
FAILED = Counter("celery_task_failed", "Tasks that failed.", [*_TASK, "exception"], registry=None)
RETRIED = Counter("celery_task_retried", "Tasks that will be retried.", _TASK, registry=None)
RUNTIME = Histogram(
    "celery_task_runtime",
    "Run time of tasks that succeeded, seconds.",
    _TASK,
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 150),
    registry=None,
)
QUEUE_WAIT = Histogram(
    "celery_task_queue_wait_seconds",
    "Time from this worker taking a message off the broker (or its ETA, if later) until a"
    " pool process started it.",
    _TASK,
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900),
    registry=None,
)
ACTIVE = Gauge(
    "celery_worker_tasks_active",
    "Tasks running now.",
    registry=None,
    multiprocess_mode="livesum",
)

FILE_METRICS: tuple[Counter | Gauge | Histogram, ...] = (
    OPERATIONS, REPLAYS, MOVED, BATCH_ITEMS, RETRIES, RENEWALS, EXPIRED_TOKENS, EXPIRED_GRANTS,
    REFUSED, DURATION,
    RECONCILE_MISMATCHES, LAST_RECONCILE, SENT, RECEIVED, STARTED, SUCCEEDED, FAILED, RETRIED,
    RUNTIME, QUEUE_WAIT, ACTIVE,
)  # fmt: skip

# Movement tasks: their result's ``amount`` is the signed change of the balance.
MOVEMENTS = frozenset(
    {"tokens.debit", "tokens.credit", "tokens.charge", "tokens.refund", "tokens.reset_balance",
     "tokens.capture"}
)  # fmt: skip
# Stamped on each request in the main process when the message arrives (queue wait).
RECEIVED_AT = "tokens_received_at"
OTHER = "other"


# --- label values, bounded ----------------------------------------------------------------------
# A refusal reports the operation type it was asked for, which may be anything a producer sent:
# only the configured ones become label values.

_known_types: frozenset[str] = frozenset()
_queues: frozenset[str] = frozenset()


def operation_type_label(operation_type: Any) -> str:
    if not isinstance(operation_type, str):
        return ""
    return operation_type if operation_type in _known_types else OTHER


def queue_label(delivery_info: Any) -> str:
    key = delivery_info.get("routing_key") if isinstance(delivery_info, dict) else None
    return key if key in _queues else OTHER


@cache
def of(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: prometheus_client checks and converts the label
    values on every call, which was most of the handlers' cost (the values are bounded)."""
    return metric.labels(*labels)


def moved(operation_type: str, amount: int) -> None:
    if amount:
        of(MOVED, operation_type, "credit" if amount > 0 else "debit").inc(abs(amount))


# --- handlers -----------------------------------------------------------------------------------


def on_operation_completed(
    sender: Any = None,
    *,
    operation: str,
    operation_type: str | None,
    amount: Any,
    success: bool,
    replayed: bool,
    duration: float,
    error_code: str | None,
    **_: Any,
) -> None:
    op_type = operation_type_label(operation_type)
    of(OPERATIONS, operation, op_type, "ok" if success else error_code or "UNKNOWN").inc()
    of(DURATION, operation).observe(duration)
    if not success:
        return
    if replayed:
        of(REPLAYS, operation, op_type).inc()
    elif operation in MOVEMENTS and type(amount) is int:
        moved(op_type, amount)


def on_renewals_counted(
    sender: Any = None,
    *,
    renewed: dict[str, int],
    tokens: dict[str, int],
    skipped: int,
    failed: int,
    tier: str | None,
    **_: Any,
) -> None:
    for name, users in renewed.items():
        of(RENEWALS, name, "renewed").inc(users)
    for given in tokens.values():
        moved("monthly_reset", given)
    if skipped:
        of(RENEWALS, tier or "all", "skipped").inc(skipped)
    if failed:
        of(RENEWALS, tier or "all", "failed").inc(failed)


def on_grants_expired(sender: Any = None, *, grants: int, tokens: int, **_: Any) -> None:
    EXPIRED_GRANTS.inc(grants)
    if tokens:
        EXPIRED_TOKENS.inc(tokens)
        # Expiry entries are ledger entries too: credits - debits stays the ledger's growth.
        moved(EXPIRY, -tokens)


def on_operation_retried(sender: Any = None, *, operation: str, **_: Any) -> None:
    of(RETRIES, operation).inc()


def on_message_refused(sender: Any = None, *, reason: str, **_: Any) -> None:
    of(REFUSED, reason if reason in REASONS else OTHER).inc()


def on_task_received(sender: Any = None, *, request: Any, **_: Any) -> None:
    # Main process. The stamp travels to the pool child with the request.
    request.request_dict[RECEIVED_AT] = time.time()
    of(RECEIVED, request.name, queue_label(request.delivery_info)).inc()


def _eta(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def on_task_prerun(sender: Any = None, *, task: Any, **_: Any) -> None:
    now = time.time()
    request = task.request
    queue = queue_label(request.delivery_info)
    of(STARTED, task.name, queue).inc()
    ACTIVE.inc()
    received = getattr(request, RECEIVED_AT, None)
    if isinstance(received, float):
        eta = _eta(request.eta)
        since = received if eta is None else max(received, eta)
        of(QUEUE_WAIT, task.name, queue).observe(max(0.0, now - since))


def on_task_postrun(sender: Any = None, **_: Any) -> None:
    ACTIVE.dec()


def on_task_success(sender: Any = None, *, result: Any, runtime: float = 0.0, **_: Any) -> None:
    request = sender.request
    queue = queue_label(request.delivery_info)
    of(SUCCEEDED, sender.name, queue).inc()
    of(RUNTIME, sender.name, queue).observe(runtime)
    if not (isinstance(result, dict) and result.get("success") is True):
        return
    name, kwargs = sender.name, request.kwargs or {}
    if name == "tokens.debit_batch":
        _count_batch(result.get("results") or [], kwargs.get("debits") or [])
    elif name == "ledger.reconcile" and kwargs.get("user_id") is None:
        RECONCILE_MISMATCHES.set(len(result.get("mismatches") or []))
        LAST_RECONCILE.set(time.time())


def _count_batch(items: list[Any], asked: list[Any]) -> None:
    # Results are in the order sent; a refused item's result names no operation type.
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        sent = asked[index] if index < len(asked) and isinstance(asked[index], dict) else {}
        op_type = operation_type_label(item.get("operation_type", sent.get("operation_type")))
        ok = item.get("success") is True
        of(BATCH_ITEMS, op_type, "ok" if ok else item.get("error_code") or "UNKNOWN").inc()
        amount = item.get("amount")
        if ok and item.get("replayed") is not True and type(amount) is int:
            moved(op_type, amount)


def on_task_failure(sender: Any = None, *, exception: BaseException, **_: Any) -> None:
    queue = queue_label(getattr(sender.request, "delivery_info", None))
    of(FAILED, sender.name, queue, type(exception).__name__).inc()


def on_task_retry(sender: Any = None, *, request: Any, **_: Any) -> None:
    of(RETRIED, sender.name, queue_label(getattr(request, "delivery_info", None))).inc()


def on_after_task_publish(
    sender: Any = None, *, headers: Any = None, routing_key: str = "", **_: Any
) -> None:
    name = headers.get("task") if isinstance(headers, dict) else None
    of(SENT, name or sender, routing_key if routing_key in _queues else OTHER).inc()


# --- what the main process reads on each scrape -------------------------------------------------

SCRAPE_TIMEOUT = 3  # seconds, for the broker and for the database alike


class BrokerQueues:
    """Queue lengths from the broker, over a connection of its own (kombu's are not
    thread-safe, and scrapes arrive on the server's threads)."""

    def __init__(self, app: Celery, queues: Collection[str]) -> None:
        self.app = app
        self.queues = sorted(queues)
        self.lock = threading.Lock()
        self.connection: Any = None

    def lengths(self) -> dict[str, int]:
        with self.lock:
            try:
                return {queue: self._length(queue) for queue in self.queues}
            except Exception:
                self.forget()
                raise

    def _length(self, queue: str) -> int:
        # Redis: the list's length; RabbitMQ: the ready messages (not those delivered and
        # unacknowledged) of a passive declare, which neither creates nor changes the queue.
        if self.connection is None:
            self.connection = self.app.connection_for_read(
                transport_options={
                    "max_retries": 1,
                    "interval_start": 0,
                    "connect_retries_timeout": SCRAPE_TIMEOUT,
                    "socket_timeout": SCRAPE_TIMEOUT,
                    "socket_connect_timeout": SCRAPE_TIMEOUT,
                }
            )
        connection = self.connection
        try:
            declared = connection.default_channel.queue_declare(queue=queue, passive=True)
            return int(declared.message_count)
        except (ChannelError, *connection.channel_errors):
            # Redis has no key for an empty queue: "no such queue". RabbitMQ answers 404 for a
            # queue not declared yet, and closes the channel: the next queue opens another.
            if connection.transport.driver_type == "amqp":
                self.forget()
            return 0

    def forget(self, close: bool = True) -> None:
        connection, self.connection = self.connection, None
        if connection is not None and close:
            try:
                connection.release()
            except Exception as exc:
                log.debug("closing the metrics broker connection: %r", exc)


@dataclass(frozen=True)
class DatabaseState:
    reservations: int
    reserved_tokens: int
    last_sweep: renewals.LastSweep | None
    debtors: int = 0
    debt: int = 0


class DatabaseReads:
    """What the scrape reads from the database: a couple of index look-ups (the domain's
    ``reservations.held`` and ``renewals.last_sweep``) over a one-connection engine of its own,
    under a statement timeout. The same for every worker (database-wide)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lock = threading.Lock()
        self.engine: Engine | None = None

    def read(self) -> DatabaseState:
        with self.lock:
            if self.engine is None:
                self.engine = self._engine()
            with Session(self.engine) as session:
                count, tokens = reservations.held(session)
                debtors, debt = grants.total_debt(session)
                return DatabaseState(
                    count, tokens, renewals.last_sweep(session), debtors=debtors, debt=debt
                )

    def _engine(self) -> Engine:
        if make_url(self.url).get_backend_name() == "sqlite":
            connect_args: dict[str, Any] = {"timeout": SCRAPE_TIMEOUT}
        else:
            connect_args = {
                "connect_timeout": SCRAPE_TIMEOUT,
                "options": f"-c statement_timeout={SCRAPE_TIMEOUT * 1000}",
            }
        return create_engine(
            self.url, pool_size=1, max_overflow=0, pool_pre_ping=True, connect_args=connect_args
        )

    def forget(self) -> None:
        """In a forked child: drop the parent's connection without closing it."""
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.dispose(close=False)


def _families() -> list[GaugeMetricFamily]:
    return [
        GaugeMetricFamily(
            "celery_queue_length", "Messages waiting in the broker queue.", labels=["queue_name"]
        ),
        GaugeMetricFamily("tokens_reservations_active", "Reservations active now."),
        GaugeMetricFamily("tokens_reserved_tokens", "Tokens held by active reservations."),
        GaugeMetricFamily(
            "tokens_last_sweep_timestamp_seconds",
            "When the latest renewal sweep was planned (Unix time).",
        ),
        GaugeMetricFamily(
            "tokens_last_sweep_users",
            "Users the latest sweep has renewed, skipped or failed so far.",
            labels=["outcome"],
        ),
        GaugeMetricFamily(
            "tokens_last_sweep_chunks_pending",
            "Chunks of the latest sweep not yet run (0: it is complete).",
        ),
        GaugeMetricFamily("tokens_accounts_in_debt", "Users whose balance is below zero."),
        GaugeMetricFamily(
            "tokens_debt_tokens", "Tokens owed: overdrafts and over-captures no grant covered."
        ),
        GaugeMetricFamily(
            "tokens_scrape_source_up",
            "Whether the source answered this scrape (1) or not (0).",
            labels=["source"],
        ),
    ]


class ScrapeCollector(Collector):
    """What is read when Prometheus scrapes, in the main process: queue lengths from the broker,
    reservations and the latest sweep from the database, and whether each source answered. Also
    forgets the in-progress count of pool processes that died without saying so (a child killed
    by a hard time limit or the OOM killer)."""

    def __init__(self, directory: Path, broker: BrokerQueues, database: DatabaseReads) -> None:
        self.directory = directory
        self.broker = broker
        self.database = database

    def describe(self) -> Iterable[Metric]:
        return _families()

    def collect(self) -> Iterator[Metric]:
        self._forget_dead_processes()
        queues, active, held, swept_at, swept, pending, debtors, debt, up = _families()
        try:
            for queue, length in self.broker.lengths().items():
                queues.add_metric([queue], length)
            up.add_metric(["broker"], 1)
        except Exception as exc:
            log.warning("metrics: could not read queue lengths: %s", one_line(exc))
            up.add_metric(["broker"], 0)
        try:
            state = self.database.read()
            active.add_metric([], state.reservations)
            held.add_metric([], state.reserved_tokens)
            debtors.add_metric([], state.debtors)
            debt.add_metric([], state.debt)
            last = state.last_sweep
            if last is not None:
                swept_at.add_metric([], last.planned_at.timestamp())
                swept.add_metric(["renewed"], last.successful)
                swept.add_metric(["skipped"], last.skipped)
                swept.add_metric(["failed"], last.failed)
                pending.add_metric([], last.pending)
            up.add_metric(["database"], 1)
        except Exception as exc:
            log.warning("metrics: could not read the database: %s", one_line(exc))
            up.add_metric(["database"], 0)
        yield from (queues, active, held, swept_at, swept, pending, debtors, debt, up)

    def _forget_dead_processes(self) -> None:
        for path in self.directory.glob("gauge_live*_*.db"):
            pid = path.stem.rpartition("_")[2]
            if pid.isdigit() and not _alive(int(pid)):
                mark_process_dead(int(pid), str(self.directory))  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- starting it --------------------------------------------------------------------------------

_HANDLERS: tuple[tuple[Any, Any], ...] = (
    (operation_completed, on_operation_completed),
    (renewals_counted, on_renewals_counted),
    (grants_expired, on_grants_expired),
    (operation_retried, on_operation_retried),
    (message_refused, on_message_refused),
    (task_received, on_task_received),
    (task_prerun, on_task_prerun),
    (task_postrun, on_task_postrun),
    (task_success, on_task_success),
    (task_failure, on_task_failure),
    (task_retry, on_task_retry),
    (after_task_publish, on_after_task_publish),
)


class Exporter:
    """The running server and what it reads; one per worker, in its main process."""

    def __init__(self, directory: Path, server: MetricsServer, collector: ScrapeCollector) -> None:
        self.directory = directory
        self.server = server
        self.collector = collector

    def after_fork(self, **_: Any) -> None:
        # A pool child serves nothing: it lets go of the listening socket and of the main
        # process's connections (without closing what the parent still uses).
        self.server.socket.close()
        self.collector.broker.forget(close=False)
        self.collector.database.forget()

    def process_exited(self, pid: int | None = None, **_: Any) -> None:
        mark_process_dead(pid or os.getpid(), str(self.directory))  # type: ignore[no-untyped-call]


_exporter: Exporter | None = None


def start(app: Celery, directory: Path, queues: Collection[str]) -> Exporter:
    """Connect the handlers and serve ``/metrics`` on ``TOKENS_METRICS_ADDR:TOKENS_METRICS_PORT``
    through the bounded listener of worker/listener.py (raises OSError if the port cannot be
    bound). Called once, in the worker's main process, before the pool starts."""
    global _exporter, _known_types, _queues
    if _exporter is not None:
        return _exporter
    settings = get_settings()
    assert settings.metrics_port is not None
    _known_types = frozenset(settings.prices) | {"capture"}
    _queues = frozenset(queues)
    for reason in REASONS:  # every reason has a series from the start, so rate() sees the first
        of(REFUSED, reason).inc(0)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    collector = ScrapeCollector(
        directory, BrokerQueues(app, queues), DatabaseReads(settings.db_url)
    )
    registry.register(collector)
    server = serve(settings.metrics_addr, settings.metrics_port, registry)
    exporter = Exporter(directory, server, collector)
    for signal, handler in _HANDLERS:
        signal.connect(handler, weak=False)
    worker_process_init.connect(exporter.after_fork, weak=False)
    worker_process_shutdown.connect(exporter.process_exited, weak=False)
    _exporter = exporter
    log.info(
        "metrics on http://%s:%d/metrics (files in %s)",
        settings.metrics_addr,
        settings.metrics_port,
        directory,
    )
    return exporter


def exported_names() -> set[str]:
    """Every sample name a scrape can hold (what alert rules and dashboards may reference)."""
    names: set[str] = set()
    families = [f for m in FILE_METRICS for f in m.describe()]
    families += _families()
    for family in families:
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
        else:
            names.add(family.name)
    return names
