"""What the main process reads on each scrape: queue lengths from the broker, and from the
database the reservations held, the debt and the latest sweep's progress, each bounded by a
timeout. Read rather than counted, they survive a worker's restart and agree across workers."""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from celery import Celery
from kombu.exceptions import ChannelError
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from accounting import grants, limits, outbox, renewals, reservations
from worker.embedded import alive
from worker.failures import one_line
from worker.settings import get_settings

log = logging.getLogger(__name__)

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
    events: outbox.Backlog | None = None
    # By period: spend limits at 90 % or more of max_tokens now, and those at it or past it.
    limits: dict[str, tuple[int, int]] = field(default_factory=dict)


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
                celery, webhook = get_settings().push_channels
                return DatabaseState(
                    count,
                    tokens,
                    renewals.last_sweep(session),
                    debtors=debtors,
                    debt=debt,
                    events=outbox.backlog(session, celery, webhook),
                    limits=limits.near(session),
                )

    def _engine(self) -> Engine:
        connect_args: dict[str, Any] = {
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


def families() -> list[GaugeMetricFamily]:
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
            "tokens_events_pending",
            "Events not yet delivered by every configured push channel (or not yet numbered).",
        ),
        GaugeMetricFamily(
            "tokens_events_oldest_pending_age_seconds",
            "Age of the oldest of those events (0 when there is none).",
        ),
        GaugeMetricFamily(
            "tokens_limits_near",
            "Spend limits whose window has used 90 % or more of max_tokens now, by period.",
            labels=["period"],
        ),
        GaugeMetricFamily(
            "tokens_limits_reached",
            "Spend limits whose window has used all of max_tokens now (or more), by period.",
            labels=["period"],
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
        return families()

    def collect(self) -> Iterator[Metric]:
        self._forget_dead_processes()
        (queues, active, held, swept_at, swept, pending, debtors, debt, events, age, near, reached,
         up) = families()  # fmt: skip
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
            for period, (close, full) in state.limits.items():
                near.add_metric([period], close)
                reached.add_metric([period], full)
            if state.events is not None:
                events.add_metric([], state.events.pending)
                age.add_metric([], state.events.oldest_seconds)
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
        yield from (queues, active, held, swept_at, swept, pending, debtors, debt, near, reached)
        yield up

    def _forget_dead_processes(self) -> None:
        for path in self.directory.glob("gauge_live*_*.db"):
            pid = path.stem.rpartition("_")[2]
            if pid.isdigit() and not alive(int(pid)):
                mark_process_dead(int(pid), str(self.directory))  # type: ignore[no-untyped-call]
