"""Project signals, for metrics and cache invalidation.

- ``balance_changed(user_id, balance, tokens_reserved, operation)``: sent after the transaction
  holding a balance change has committed, never for one that rolled back.
- ``operation_completed(operation, user_id, amount, success, duration, error, error_code)``: sent
  once per task outcome: a success, a refusal (``error``/``error_code`` of the contract), or a
  final failure (``error_code`` ``TIME_LIMIT_EXCEEDED``, ``DATABASE_ERROR`` or ``INTERNAL_ERROR``,
  ``error`` the exception in one line). Not for an attempt that is retried, nor for a task
  replaced by another (whoever finishes under its task id reports).
- ``operation_retried(operation, task_id, attempt, error)``: an attempt (1 for the first) failed
  with a transient error and the task will run again.
- ``message_refused(task_id, task, reason, error)``: the worker refused a message before any task
  saw it (worker/poison.py); sent in the worker's main process. ``task_id`` and ``task`` are None
  when unreadable; ``reason`` is one of ``worker.poison.REASONS``.

Handlers listed in ``TOKENS_BALANCE_CHANGED_HANDLERS``, ``TOKENS_OPERATION_COMPLETED_HANDLERS``,
``TOKENS_OPERATION_RETRIED_HANDLERS`` and ``TOKENS_MESSAGE_REFUSED_HANDLERS`` (JSON lists of dotted
paths) are connected by :func:`connect_configured_handlers`.
"""

from __future__ import annotations

import logging
from importlib import import_module
from typing import Any

from celery.utils.dispatch import Signal
from sqlalchemy import event
from sqlalchemy.orm import Session, SessionTransaction

from worker.settings import get_settings

log = logging.getLogger(__name__)

balance_changed = Signal(
    name="balance_changed", providing_args={"user_id", "balance", "tokens_reserved", "operation"}
)
operation_completed = Signal(
    name="operation_completed",
    providing_args={"operation", "user_id", "amount", "success", "duration", "error", "error_code"},
)
operation_retried = Signal(
    name="operation_retried", providing_args={"operation", "task_id", "attempt", "error"}
)
message_refused = Signal(
    name="message_refused", providing_args={"task_id", "task", "reason", "error"}
)

_PENDING = "pending_balance_changes"


def note_balance_change(
    session: Session, *, user_id: str, balance: int, tokens_reserved: int, operation: str
) -> None:
    """Queue a ``balance_changed`` to be sent once ``session`` commits; dropped if the transaction
    or savepoint it was noted in rolls back."""
    noted_in = session.get_nested_transaction() or session.get_transaction()
    session.info.setdefault(_PENDING, []).append(
        (
            noted_in,
            {
                "user_id": user_id,
                "balance": balance,
                "tokens_reserved": tokens_reserved,
                "operation": operation,
            },
        )
    )


@event.listens_for(Session, "after_commit")
def _send_after_commit(session: Session) -> None:
    # SQLAlchemy sends after_commit when a savepoint is released too; nothing is committed yet.
    if session.in_nested_transaction():
        return
    for _noted_in, change in session.info.pop(_PENDING, []):
        # A broken handler must not turn a committed movement into a failed task.
        for _receiver, response in balance_changed.send(sender=None, **change):
            if isinstance(response, Exception):
                log.error("balance_changed handler failed: %r", response)


def _within(transaction: SessionTransaction | None, outer: SessionTransaction) -> bool:
    while transaction is not None:
        if transaction is outer:
            return True
        transaction = transaction.parent
    return False


@event.listens_for(Session, "after_soft_rollback")
def _forget_after_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    # A savepoint's rollback drops only what was noted inside it; the rest may still commit.
    pending = session.info.get(_PENDING)
    if pending:
        session.info[_PENDING] = [p for p in pending if not _within(p[0], previous_transaction)]


@event.listens_for(Session, "after_transaction_end")
def _forget_uncommitted(session: Session, transaction: SessionTransaction) -> None:
    # The outermost transaction ended without a commit (say, the session was closed).
    if transaction.parent is None:
        session.info.pop(_PENDING, None)


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
                signal.connect(resolve(path), weak=False)
                _connected.add((signal.name, path))
