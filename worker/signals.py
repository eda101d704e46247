"""Project signals, for metrics and cache invalidation.

- ``balance_changed(user_id, balance, tokens_reserved, operation)``: the domain's event
  (``accounting/events.py``), sent after the transaction holding a balance change has committed,
  never for one that rolled back.
- ``renewals_counted(renewed, tokens, skipped, failed, tier)``: the domain's event
  (``accounting/events.py``), sent after a sweep chunk's or a ``renew_user``'s renewals have
  committed: users renewed and tokens given per tier, users skipped or failed (metrics).
- ``grants_expired(grants, tokens)``: the domain's event (``accounting/events.py``), sent after
  expiry entries have committed: how many grants expired and the tokens they took (metrics).
- ``operation_completed(operation, task_id, user_id, operation_type, amount, success, replayed,
  duration, error, error_code, limit)``: sent once per task outcome: a success, a refusal
  (``error``/``error_code`` of the contract; ``limit``, the refusing spend limit, for
  ``LIMIT_EXCEEDED``), or a final failure (``error_code``
  ``TIME_LIMIT_EXCEEDED``, ``DATABASE_ERROR`` or ``INTERNAL_ERROR``, ``error`` the exception in
  one line). ``operation_type`` is the movement's (or the one asked for, else None); ``replayed``
  is true when an earlier identical request had already done it. Not for an attempt that is
  retried, nor for a task replaced by another (whoever finishes under its task id reports).
  A ``tokens`` CLI command sends it too, as the task of the same name would, with ``task_id``
  None.
- ``operation_retried(operation, task_id, attempt, error)``: an attempt (1 for the first) failed
  with a transient error and the task will run again.
- ``message_refused(task_id, task, reason, error, producer)``: the worker refused a message before
  any task saw it (worker/poison.py); sent in the worker's main process. ``task_id`` and ``task``
  are None when unreadable; ``reason`` is one of ``worker.poison.REASONS``, or ``unauthorized``
  for a message from no allowed producer (worker/producers.py; ``producer`` is then the one it
  named, None when none could be; None for every other reason).

Handlers listed in ``TOKENS_BALANCE_CHANGED_HANDLERS``, ``TOKENS_OPERATION_COMPLETED_HANDLERS``,
``TOKENS_OPERATION_RETRIED_HANDLERS`` and ``TOKENS_MESSAGE_REFUSED_HANDLERS`` (JSON lists of dotted
paths) are connected by :func:`connect_configured_handlers`.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

from celery.utils.dispatch import Signal

from accounting.events import (
    balance_changed,
    grants_expired,
    note_balance_change,
    renewals_counted,
)
from worker.settings import ConfigurationError, get_settings

__all__ = [
    "FAILURE_CODES",
    "balance_changed",
    "connect_configured_handlers",
    "grants_expired",
    "note_balance_change",
    "operation_completed",
    "renewals_counted",
    "send_completed",
]

# The error codes of a final failure (not a refusal: those are the contract's).
FAILURE_CODES = frozenset({"TIME_LIMIT_EXCEEDED", "DATABASE_ERROR", "INTERNAL_ERROR"})

log = logging.getLogger(__name__)

operation_completed = Signal(
    name="operation_completed",
    providing_args={
        "operation",
        "task_id",
        "user_id",
        "operation_type",
        "amount",
        "success",
        "replayed",
        "duration",
        "error",
        "error_code",
        "limit",
    },
)
operation_retried = Signal(
    name="operation_retried", providing_args={"operation", "task_id", "attempt", "error"}
)
message_refused = Signal(
    name="message_refused", providing_args={"task_id", "task", "reason", "error", "producer"}
)


def send_completed(
    operation: str,
    task_id: str | None,
    kwargs: dict[str, Any],
    outcome: dict[str, Any],
    duration: float,
    error: str | None = None,
    error_code: str | None = None,
) -> None:
    """Send ``operation_completed`` for ``operation`` asked with ``kwargs`` that ended in
    ``outcome`` (a result dict; empty for a failure, given by ``error``/``error_code``)."""
    user_id = kwargs.get("user_id")
    # A movement reports its signed amount; a refusal or failure, the amount it was asked for.
    asked = kwargs.get("amount")
    amount = outcome.get("amount", asked if type(asked) is int else None)
    operation_type = outcome.get("operation_type", kwargs.get("operation_type"))
    operation_completed.send(
        sender=operation,
        operation=operation,
        task_id=task_id,
        user_id=user_id if isinstance(user_id, str) else None,
        operation_type=operation_type if isinstance(operation_type, str) else None,
        amount=amount,
        success=bool(outcome.get("success")),
        replayed=outcome.get("replayed") is True,
        duration=duration,
        error=error if error is not None else outcome.get("error"),
        error_code=error_code if error_code is not None else outcome.get("error_code"),
        # LIMIT_EXCEEDED: the refusing limit (contract v1.2)
        limit=outcome.get("limit"),
    )


def resolve(path: str) -> Any:
    module, _, attr = path.replace(":", ".").rpartition(".")
    if not module:
        raise ValueError(f"not a dotted path: {path!r}")
    return getattr(import_module(module), attr)


_connected: set[tuple[str, str]] = set()


def connect_configured_handlers() -> None:
    settings = get_settings()
    for signal, paths in (
        (balance_changed, settings.balance_changed_handlers),
        (operation_completed, settings.operation_completed_handlers),
        (operation_retried, settings.operation_retried_handlers),
        (message_refused, settings.message_refused_handlers),
    ):
        for path in paths:
            if (signal.name, path) not in _connected:
                try:
                    handler = resolve(path)
                except (ImportError, AttributeError, ValueError) as exc:
                    variable = f"TOKENS_{signal.name.upper()}_HANDLERS"
                    raise ConfigurationError(f"{variable}: cannot load {path!r}: {exc}") from None
                signal.connect(handler, weak=False)
                _connected.add((signal.name, path))
