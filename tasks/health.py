"""A canary for liveness checks and benchmarks: broker -> worker -> database -> result backend."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from accounting.clock import db_now
from models.schemas import NoArgsIn, PingOut
from tasks.base import contract_task
from worker.celery import app


@contract_task("health.ping", NoArgsIn)
def ping(session: Session, _p: NoArgsIn, _task_id: str | None) -> PingOut:
    # One round trip to the database, which also answers with its clock.
    return PingOut(at=db_now(session))


@app.task(name="health.noop")  # type: ignore[untyped-decorator]
def noop(*_args: Any, **_kwargs: Any) -> dict[str, bool]:
    """Not in the contract: a task that does nothing (no validation, no database), routed like
    ``tokens.debit``. The transport's own cost, the baseline of ``bench.transport``."""
    return {"success": True}
