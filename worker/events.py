"""Events as the worker's settings configure them: which push channels, their retention."""

from __future__ import annotations

from sqlalchemy.orm import Session

from accounting import outbox
from token_worker_client.models import Result
from worker.settings import get_settings


class PrunedOut(Result):
    deleted: int


def prune(session: Session) -> PrunedOut:
    """``events.prune``: events older than ``TOKENS_EVENTS_RETENTION_DAYS`` that every configured
    push channel has delivered go."""
    settings = get_settings()
    celery, webhook = settings.push_channels
    while outbox.number(session):  # only numbered events go (with no relay, nothing numbers)
        pass
    deleted = outbox.prune(session, settings.events_retention_days, celery, webhook)
    return PrunedOut(deleted=deleted)
