"""Prometheus metrics of a worker, in prometheus_client's multiprocess mode.

Every process of a prefork worker (the main process and each pool child) writes its samples to
files of its own in one directory (``PROMETHEUS_MULTIPROC_DIR``); the main process serves them
all, merged, on ``TOKENS_METRICS_PORT`` (one server per worker, on loopback unless
``TOKENS_METRICS_ADDR`` says otherwise, bounded: worker/listener.py). prometheus_client chooses its
storage (files or memory) when it is first imported, so this package is imported only once
worker/celery.py has set that directory, at ``worker_init`` in the main process, before the
pool forks; the children inherit it.

One module per concern:

- ``definitions``: the metrics the processes write (counters, gauges, histograms);
- ``labels``: label values, bounded to the configured operation types and queues;
- ``handlers``: the signal handlers that feed them (a few counter increments per task, no
  database work);
- ``scrape``: what the main process reads on each scrape (queue lengths from the broker; the
  reservations held, the debt and the latest sweep from the database), each under a timeout;
- ``exporter``: :func:`start`, which connects the handlers and serves ``/metrics``, and
  :func:`exported_names`, every sample name a scrape can hold.
"""

from __future__ import annotations

from worker.metrics.definitions import FILE_METRICS, MOVEMENTS, RECEIVED_AT
from worker.metrics.exporter import Exporter, exported_names, start
from worker.metrics.handlers import (
    HANDLERS,
    on_after_task_publish,
    on_grants_expired,
    on_message_refused,
    on_operation_completed,
    on_operation_retried,
    on_renewals_counted,
    on_task_failure,
    on_task_postrun,
    on_task_prerun,
    on_task_received,
    on_task_retry,
    on_task_success,
)
from worker.metrics.labels import configure
from worker.metrics.scrape import (
    SCRAPE_TIMEOUT,
    BrokerQueues,
    DatabaseReads,
    DatabaseState,
    ScrapeCollector,
)

__all__ = [
    "FILE_METRICS",
    "HANDLERS",
    "MOVEMENTS",
    "RECEIVED_AT",
    "SCRAPE_TIMEOUT",
    "BrokerQueues",
    "DatabaseReads",
    "DatabaseState",
    "Exporter",
    "ScrapeCollector",
    "configure",
    "exported_names",
    "on_after_task_publish",
    "on_grants_expired",
    "on_message_refused",
    "on_operation_completed",
    "on_operation_retried",
    "on_renewals_counted",
    "on_task_failure",
    "on_task_postrun",
    "on_task_prerun",
    "on_task_received",
    "on_task_retry",
    "on_task_success",
    "start",
]
