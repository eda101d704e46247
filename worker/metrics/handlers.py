"""What feeds the file metrics: handlers of signals the worker sends anyway (a few counter
increments per task, no database work). Connected by :func:`worker.metrics.exporter.start`.

- ``operation_completed`` (every contract task's outcome, in the pool child; in the main process
  for a hard time limit): operations, durations, replays and the tokens moved;
- ``renewals_counted`` and ``grants_expired`` (the domain's events, after they commit);
- ``operation_retried``, ``message_refused`` (main process);
- Celery's task signals: ``celery_task_*`` as celery-exporter names them, and the results of
  ``tokens.debit_batch`` and ``ledger.reconcile`` (``task_success``).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from celery.signals import (
    after_task_publish,
    task_failure,
    task_postrun,
    task_prerun,
    task_received,
    task_retry,
    task_success,
)

from accounting.events import grants_expired, renewals_counted
from accounting.grants import EXPIRY
from worker import relay
from worker.metrics.definitions import (
    ACTIVE,
    BATCH_ITEMS,
    CHAIN_BROKEN,
    DURATION,
    EVENT_DELIVERIES,
    EXPIRED_GRANTS,
    EXPIRED_TOKENS,
    FAILED,
    LAST_RECONCILE,
    LAST_VERIFY,
    LEDGER_MONTHS_UNTIL,
    LEDGER_OUTSIDE_MONTHS,
    LIMIT_REFUSALS,
    MOVEMENTS,
    OPERATIONS,
    OTHER,
    QUEUE_WAIT,
    RECEIVED,
    RECEIVED_AT,
    RECONCILE_MISMATCHES,
    REFUSED,
    RENEWALS,
    REPLAYS,
    RETRIED,
    RETRIES,
    RUNTIME,
    SENT,
    STARTED,
    SUCCEEDED,
    UNAUTHORIZED,
)
from worker.metrics.labels import (
    known_queue,
    moved,
    of,
    operation_type_label,
    period_label,
    queue_label,
)
from worker.poison import REASONS
from worker.poison import UNAUTHORIZED as UNAUTHORIZED_REASON
from worker.producers import UNKNOWN
from worker.signals import message_refused, operation_completed, operation_retried


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
    limit: Any = None,
    **_: Any,
) -> None:
    op_type = operation_type_label(operation_type)
    of(OPERATIONS, operation, op_type, "ok" if success else error_code or "UNKNOWN").inc()
    of(DURATION, operation).observe(duration)
    if not success:
        _count_limit(limit)
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


def on_message_refused(
    sender: Any = None,
    *,
    reason: str,
    task: str | None = None,
    producer: str | None = None,
    **_: Any,
) -> None:
    if reason == UNAUTHORIZED_REASON:
        # Bounded: a producer is named only if the setting has it, and the check runs once
        # the task is known to be registered.
        of(UNAUTHORIZED, producer or UNKNOWN, task or UNKNOWN).inc()
        return
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
    elif name == "ledger.verify" and kwargs.get("user_id") is None:
        CHAIN_BROKEN.set(len(result.get("broken") or []))
        LAST_VERIFY.set(time.time())
    elif name == "ledger.make_months":
        LEDGER_MONTHS_UNTIL.set(datetime.fromisoformat(result["until"]).timestamp())
        LEDGER_OUTSIDE_MONTHS.set(result["outside"])


def _count_batch(items: list[Any], asked: list[Any]) -> None:
    # Results are in the order sent; a refused item's result names no operation type.
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        sent = asked[index] if index < len(asked) and isinstance(asked[index], dict) else {}
        op_type = operation_type_label(item.get("operation_type", sent.get("operation_type")))
        ok = item.get("success") is True
        of(BATCH_ITEMS, op_type, "ok" if ok else item.get("error_code") or "UNKNOWN").inc()
        if not ok:
            _count_limit(item.get("limit"))
        amount = item.get("amount")
        if ok and item.get("replayed") is not True and type(amount) is int:
            moved(op_type, amount)


def _count_limit(limit: Any) -> None:
    """A LIMIT_EXCEEDED refusal (it alone carries ``limit``), by its limit's period."""
    if isinstance(limit, dict):
        of(LIMIT_REFUSALS, period_label(limit.get("period"))).inc()


def on_task_failure(sender: Any = None, *, exception: BaseException, **_: Any) -> None:
    queue = queue_label(getattr(sender.request, "delivery_info", None))
    of(FAILED, sender.name, queue, type(exception).__name__).inc()


def on_task_retry(sender: Any = None, *, request: Any, **_: Any) -> None:
    of(RETRIED, sender.name, queue_label(getattr(request, "delivery_info", None))).inc()


def on_after_task_publish(
    sender: Any = None, *, headers: Any = None, routing_key: str = "", **_: Any
) -> None:
    name = headers.get("task") if isinstance(headers, dict) else None
    of(SENT, name or sender, known_queue(routing_key)).inc()


def on_events_delivered(channel: str, outcome: str, count: int, **_: Any) -> None:
    EVENT_DELIVERIES.labels(channel, outcome).inc(count)


HANDLERS: tuple[tuple[Any, Any], ...] = (
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
    (relay.delivered, on_events_delivered),
)
