"""A canary for liveness checks and benchmarks: broker -> worker -> database -> result backend."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from models.schemas import NoArgsIn, PingOut
from models.tables import utcnow
from tasks.base import contract_task


@contract_task("health.ping", NoArgsIn)
def ping(session: Session, _p: NoArgsIn, _task_id: str | None) -> PingOut:
    session.execute(text("SELECT 1"))
    return PingOut(at=utcnow())
