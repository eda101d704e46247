"""Events (contract v1.2): pulling them, alerts and automatic top-up, and their retention."""

from __future__ import annotations

from sqlalchemy.orm import Session

from accounting import alerts, outbox
from models.schemas import NoArgsIn
from tasks.base import contract_task
from token_worker_client.events import (
    AlertsOut,
    EventsListIn,
    EventsOut,
    SetAlertsIn,
    SetAutoTopupIn,
)
from worker.events import PrunedOut, prune


@contract_task("events.list", EventsListIn)
def list_events(session: Session, p: EventsListIn, _task_id: str | None) -> EventsOut:
    return outbox.list_events(session, p.after, p.limit, p.user_id)


@contract_task("tokens.set_alerts", SetAlertsIn)
def set_alerts(session: Session, p: SetAlertsIn, _task_id: str | None) -> AlertsOut:
    return alerts.set_alerts(session, p.user_id, p.thresholds)


@contract_task("tokens.set_auto_topup", SetAutoTopupIn)
def set_auto_topup(session: Session, p: SetAutoTopupIn, _task_id: str | None) -> AlertsOut:
    return alerts.set_auto_topup(session, p.user_id, p.below, p.amount, p.max_per_month)


@contract_task("events.prune", NoArgsIn)
def prune_events(session: Session, _p: NoArgsIn, _task_id: str | None) -> PrunedOut:
    return prune(session)
