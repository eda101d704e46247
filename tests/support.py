"""Test helpers: real worker processes, and a producer that knows only the contract."""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker.devenv import ROOT, WorkerProcess, producer, running_workers

__all__ = ["ROOT", "TABLES", "WorkerProcess", "call", "producer", "running_workers"]

TABLES = ("idempotency_records", "reservations", "ledger_entries", "accounts")


def call(app: Celery, name: str, /, **kwargs: Any) -> dict[str, Any]:
    """Send ``name`` with ``kwargs`` and wait for its result."""
    result: dict[str, Any] = app.send_task(name, kwargs=kwargs).get(timeout=60)
    return result


# --- domain-level helpers --------------------------------------------------------------------


def refused(session: Session, action: Callable[..., Any], /, *args: Any, **kwargs: Any) -> DomainError:
    """Run ``action(session, …)``, expect a refusal, and roll back as every caller does."""
    try:
        action(session, *args, **kwargs)
    except DomainError as exc:
        session.rollback()
        return exc
    finally:
        if session.in_transaction() and not session.info.get("keep"):
            pass
    raise AssertionError(f"{getattr(action, '__name__', action)} was not refused")
