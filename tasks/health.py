"""A canary for liveness checks and benchmarks: broker -> worker -> database -> result backend."""

from __future__ import annotations

from sqlalchemy.orm import Session

from accounting.clock import db_now
from models.schemas import NoArgsIn, PingOut
from tasks.base import contract_task


@contract_task("health.ping", NoArgsIn)
def ping(session: Session, _p: NoArgsIn, _task_id: str | None) -> PingOut:
    # One round trip to the database, which also answers with its clock.
    return PingOut(at=db_now(session))
