"""Idempotency keys: claim a key before acting, store the outcome in the same transaction.

A key is claimed by inserting its row. A concurrent request with the same key blocks on that
uncommitted row until the first commits (then sees it and replays) or rolls back (then claims it
itself), so two deliveries of one message can never both apply.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar, cast

from pydantic import BaseModel
from sqlalchemy import Insert, bindparam, delete, literal, select, tuple_, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import CursorResult
from sqlalchemy.orm import Session

from accounting import clock
from accounting.errors import idempotency_conflict
from models.tables import idempotency_table


def request_hash(operation: str, **params: Any) -> str:
    """A digest of what a request asks for, to tell a replay from a key reused for another one."""
    body = json.dumps([operation, params], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(body.encode()).hexdigest()


def insert_ignoring_conflicts(table: Any) -> Insert:
    """``INSERT … ON CONFLICT DO NOTHING``."""
    return postgresql.insert(table).on_conflict_do_nothing()


R = TypeVar("R", bound=BaseModel)

_records = idempotency_table
_READ = select(_records.c.request_hash, _records.c.response).where(
    _records.c.user_id == bindparam("uid"), _records.c.key == bindparam("k")
)
_WITHDRAW = delete(_records).where(
    _records.c.user_id == bindparam("uid"),
    _records.c.key == bindparam("k"),
    _records.c.response.is_(None),
)
_RECORD = (
    update(_records)
    .where(_records.c.user_id == bindparam("uid"), _records.c.key == bindparam("k"))
    .values(response=bindparam("response", type_=_records.c.response.type))
)


_CLAIM = (
    insert_ignoring_conflicts(_records).values(created_at=clock.now_sql()).returning(_records.c.key)
)


def claim(session: Session, user_id: str, key: str | None, digest: str) -> dict[str, Any] | None:
    """Claim ``key`` for this request. Returns the stored response when it was already done.

    Raises IDEMPOTENCY_CONFLICT when the key was used for a different request.
    """
    if key is None:
        return None
    claimed = session.execute(
        _CLAIM, {"user_id": user_id, "key": key, "request_hash": digest}
    ).first()
    if claimed is not None:
        return None
    stored = session.execute(_READ, {"uid": user_id, "k": key}).one()
    if stored.request_hash != digest:
        raise idempotency_conflict()
    # Every committed claim carries its outcome (a refused request's claim is rolled back or
    # withdrawn), so one without is this transaction's own, made ahead by claim_many.
    response: dict[str, Any] | None = stored.response
    return response


def claim_many(session: Session, claims: Iterable[tuple[str, str, str]]) -> None:
    """Claim several (user_id, key, digest) at once, in (user_id, key) order.

    A transaction that will lock several accounts (a batch) claims all its keys first: every
    movement takes its key before its account, so with keys before accounts everywhere, and
    each kind in one order, no two transactions can wait for each other in a cycle. Each item
    then calls :func:`claim` as usual, which finds its own claim and goes ahead; an item that
    is refused gives its key back with :func:`withdraw`.
    """
    first: dict[tuple[str, str], str] = {}
    for user_id, key, digest in claims:
        first.setdefault((user_id, key), digest)
    if first:
        session.execute(
            insert_ignoring_conflicts(_records).values(created_at=clock.now_sql()),
            [{"user_id": u, "key": k, "request_hash": first[(u, k)]} for u, k in sorted(first)],
        )


def withdraw(session: Session, user_id: str, key: str | None) -> None:
    """Give back a claim this transaction made ahead and did not use (its request was refused),
    so the key stays free, as for a refused single request."""
    if key is not None:
        session.execute(_WITHDRAW, {"uid": user_id, "k": key})


def record(session: Session, user_id: str, key: str | None, response: dict[str, Any]) -> None:
    """Store the outcome of a claimed key (same transaction as the effect)."""
    if key is None:
        return
    session.execute(_RECORD, {"uid": user_id, "k": key, "response": response})


# --- retention -------------------------------------------------------------------------------

PRUNE_CHUNK = 10_000


def prune(session: Session, retention: timedelta, limit: int = PRUNE_CHUNK) -> int:
    """Delete up to ``limit`` records older than ``retention`` (by the database's clock), oldest
    first; returns how many. Past the retention a key no longer replays: the same request
    applies again."""
    cutoff = clock.now_sql() - literal(retention)
    # Rows a live transaction holds (a claim being decided) are skipped, not waited for.
    oldest = (
        select(_records.c.user_id, _records.c.key)
        .where(_records.c.created_at < cutoff)
        .order_by(_records.c.created_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    gone = session.execute(
        delete(_records).where(tuple_(_records.c.user_id, _records.c.key).in_(oldest))
    )
    return int(cast(CursorResult[Any], gone).rowcount)


def prune_all(
    sessions: Callable[[], Session],
    retention: timedelta,
    chunk_size: int = PRUNE_CHUNK,
    on_chunk: Callable[[int], None] | None = None,
) -> int:
    """:func:`prune` in chunks of ``chunk_size``, one transaction each, until none is left:
    bounded memory and short locks, whatever the backlog. Returns how many were deleted."""
    total = 0
    while True:
        with sessions() as session, session.begin():
            n = prune(session, retention, chunk_size)
        total += n
        if on_chunk is not None:
            on_chunk(n)
        if n < chunk_size:
            return total
