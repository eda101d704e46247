"""Idempotency keys: claim a key before acting, store the outcome in the same transaction.

A key is claimed by inserting its row. A concurrent request with the same key blocks on that
uncommitted row until the first commits (then sees it and replays) or rolls back (then claims it
itself), so two deliveries of one message can never both apply.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from sqlalchemy import Insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from accounting.errors import idempotency_conflict
from models.tables import IdempotencyRecord, utcnow


def request_hash(operation: str, **params: Any) -> str:
    """A digest of what a request asks for, to tell a replay from a key reused for another one."""
    body = json.dumps([operation, params], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def insert_ignoring_conflicts(session: Session, table: Any) -> Insert:
    """``INSERT … ON CONFLICT DO NOTHING`` in the session's dialect."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise NotImplementedError(f"no ON CONFLICT support for {dialect}")


def claim(session: Session, user_id: str, key: str | None, digest: str) -> dict[str, Any] | None:
    """Claim ``key`` for this request. Returns the stored response when it was already done.

    Raises IDEMPOTENCY_CONFLICT when the key was used for a different request.
    """
    if key is None:
        return None
    stmt = (
        insert_ignoring_conflicts(session, IdempotencyRecord)
        .values(user_id=user_id, key=key, request_hash=digest, created_at=utcnow())
        .returning(IdempotencyRecord.key)
    )
    if session.execute(stmt).first() is not None:
        return None
    stored = session.execute(
        select(IdempotencyRecord.request_hash, IdempotencyRecord.response).where(
            IdempotencyRecord.user_id == user_id, IdempotencyRecord.key == key
        )
    ).one()
    if stored.request_hash != digest:
        raise idempotency_conflict()
    response: dict[str, Any] = stored.response
    return response


def record(session: Session, user_id: str, key: str | None, response: dict[str, Any]) -> None:
    """Store the outcome of a claimed key (same transaction as the effect)."""
    if key is None:
        return
    session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.user_id == user_id, IdempotencyRecord.key == key)
        .values(response=response)
        .execution_options(synchronize_session=False)
    )
