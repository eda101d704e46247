"""Starting it: one exporter per worker, in its main process, serving every process's files
merged, plus what is read at scrape time, through the bounded listener of worker/listener.py."""

from __future__ import annotations

import logging
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import beat_embedded_init, worker_process_init, worker_process_shutdown
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from worker.listener import MetricsServer, serve
from worker.metrics import labels
from worker.metrics.definitions import FILE_METRICS, REFUSED
from worker.metrics.handlers import HANDLERS
from worker.metrics.labels import of
from worker.metrics.scrape import BrokerQueues, DatabaseReads, ScrapeCollector, families
from worker.poison import REASONS
from worker.settings import get_settings

log = logging.getLogger(__name__)


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

    def in_embedded_beat(self, **_: Any) -> None:
        # Beat inside the worker (-B) is a child that closed every inherited descriptor before it
        # opened its own connections, so they took the numbers of the metric files the main
        # process had open. The first sample it wrote made prometheus_client see a new pid and
        # close those stale files: the close went to whichever socket now held the number (seen
        # as OSError 29, Illegal seek, on every start). Beat writes no samples at all instead.
        for signal, handler in HANDLERS:
            signal.disconnect(handler)

    def process_exited(self, pid: int | None = None, **_: Any) -> None:
        mark_process_dead(pid or os.getpid(), str(self.directory))  # type: ignore[no-untyped-call]


_exporter: Exporter | None = None


def start(app: Celery, directory: Path, queues: Collection[str]) -> Exporter:
    """Connect the handlers and serve ``/metrics`` on ``TOKENS_METRICS_ADDR:TOKENS_METRICS_PORT``
    through the bounded listener of worker/listener.py (raises OSError if the port cannot be
    bound). Called once, in the worker's main process, before the pool starts."""
    global _exporter
    if _exporter is not None:
        return _exporter
    settings = get_settings()
    assert settings.metrics_port is not None
    labels.configure(frozenset(settings.prices) | {"capture"}, frozenset(queues))
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
    for signal, handler in HANDLERS:
        signal.connect(handler, weak=False)
    worker_process_init.connect(exporter.after_fork, weak=False)
    worker_process_shutdown.connect(exporter.process_exited, weak=False)
    beat_embedded_init.connect(exporter.in_embedded_beat, weak=False)
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
    described = [f for m in FILE_METRICS for f in m.describe()]
    for family in [*described, *families()]:
        if family.type == "counter":
            names.add(f"{family.name}_total")
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
        else:
            names.add(family.name)
    return names
