"""Idempotency keys: claim a key before acting, store the outcome in the same transaction.

A key is claimed by inserting its row. A concurrent request with the same key blocks on that
uncommitted row until the first commits (then sees it and replays) or rolls back (then claims it
itself), so two deliveries of one message can never both apply.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import Insert, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from accounting.errors import idempotency_conflict
from models.tables import idempotency_table, utcnow


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


R = TypeVar("R", bound=BaseModel)

_records = idempotency_table
_claims: dict[str, Insert] = {}
_READ = select(_records.c.request_hash, _records.c.response).where(
    _records.c.user_id == bindparam("uid"), _records.c.key == bindparam("k")
)
_RECORD = (
    update(_records)
    .where(_records.c.user_id == bindparam("uid"), _records.c.key == bindparam("k"))
    .values(response=bindparam("response", type_=_records.c.response.type))
)


def _claim_statement(session: Session) -> Insert:
    dialect = session.get_bind().dialect.name
    stmt = _claims.get(dialect)
    if stmt is None:
        stmt = _claims[dialect] = insert_ignoring_conflicts(session, _records).returning(
            _records.c.key
        )
    return stmt


def claim(session: Session, user_id: str, key: str | None, digest: str) -> dict[str, Any] | None:
    """Claim ``key`` for this request. Returns the stored response when it was already done.

    Raises IDEMPOTENCY_CONFLICT when the key was used for a different request.
    """
    if key is None:
        return None
    claimed = session.execute(
        _claim_statement(session),
        {"user_id": user_id, "key": key, "request_hash": digest, "created_at": utcnow()},
    ).first()
    if claimed is not None:
        return None
    stored = session.execute(_READ, {"uid": user_id, "k": key}).one()
    if stored.request_hash != digest:
        raise idempotency_conflict()
    response: dict[str, Any] = stored.response
    return response


def replay(
    session: Session, user_id: str, key: str | None, digest: str, result: type[R]
) -> R | None:
    """:func:`claim`, with a stored outcome returned as ``result`` marked ``replayed``."""
    stored = claim(session, user_id, key, digest)
    return None if stored is None else result(**{**stored, "replayed": True})


def record(session: Session, user_id: str, key: str | None, response: dict[str, Any]) -> None:
    """Store the outcome of a claimed key (same transaction as the effect)."""
    if key is None:
        return
    session.execute(_RECORD, {"uid": user_id, "k": key, "response": response})
