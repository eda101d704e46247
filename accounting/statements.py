"""How the one-statement movements (PostgreSQL functions, migrations 0005 on) are called.

In a caller's transaction (the CLI, tests, a batch's savepoint) a function returns its refusal
as a ``status`` and leaves what it did (the key's claim, expiries) to the caller, whose
transaction rolls back.

*Alone* (``worker.db.statement_scope``) the statement is the whole transaction, one round trip
with no BEGIN or COMMIT, on a pooled connection in autocommit used directly, without the
Session's or the Core's per-statement machinery: the scope's session is an
:class:`AloneSession`, made with the function that runs a statement so (a :data:`Runner`),
decided once, where the scope is opened. The statement is
filtered through ``tokens_ok()`` (migration 0006), which raises on a refusal so that it leaves
nothing behind; the refusal comes back from the error's detail as the row the function returned.
The events are noted on the session as in a transaction and sent when the scope commits it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from types import SimpleNamespace
from typing import Any, TypeVar

from pydantic import BaseModel
from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from accounting.errors import idempotency_conflict, user_not_found
from accounting.events import note_balance_change, note_grants_expired

# tokens_ok()'s SQLSTATE for a refusal.
REFUSED = "TKREF"

# Runs one statement (driver placeholders, ``%(name)s``) in autocommit and returns its one row
# with attribute access; a database error comes as SQLAlchemy's DBAPIError, as from a Session.
Runner = Callable[[str, dict[str, Any]], Any]


class AloneSession(Session):
    """A session whose movements run alone (``worker.db.statement_scope`` makes one): each
    function is sent by ``run``, on a connection in autocommit, and is its own transaction. The
    session itself still carries the events noted, sent when the scope ends."""

    def __init__(self, run: Runner, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run = run


_texts: dict[str, TextClause] = {}
_driver_sql: dict[str, str] = {}
_NAMED = re.compile(r"(?<![:\w]):(\w+)")


def alone(session: Session) -> bool:
    """Whether ``session``'s movements run alone, each statement its own transaction."""
    return isinstance(session, AloneSession)


def call(session: Session, function: str, params: dict[str, Any]) -> Any:
    """``SELECT * FROM <function>`` (a call with named parameters, such as
    ``tokens_spend(:user_id, ...)``): the function's one row, with attribute access. Alone, a
    refusal is the same row, rebuilt from ``tokens_ok()``'s error after the statement rolled
    back (JSON: arrays as lists, ``jsonb`` as dicts, as psycopg returns them)."""
    if not isinstance(session, AloneSession):
        statement = _texts.get(function)
        if statement is None:
            statement = _texts[function] = text(f"SELECT * FROM {function}")
        return session.execute(statement, params).one()
    sql = _driver_sql.get(function)
    if sql is None:
        named = _NAMED.sub(r"%(\1)s", function)
        # The status test first: tokens_ok() and to_jsonb() run only for a refusal.
        sql = _driver_sql[function] = (
            f"SELECT r.* FROM {named} AS r "
            "WHERE r.status IN ('ok', 'replay') OR tokens_ok(to_jsonb(r))"
        )
    try:
        return session.run(sql, params)
    except DBAPIError as exc:
        if getattr(exc.orig, "sqlstate", None) != REFUSED:
            raise
        detail = exc.orig.diag.message_detail  # type: ignore[union-attr]
        return SimpleNamespace(**json.loads(detail))


R = TypeVar("R", bound=BaseModel)


def replayed(row: Any, result: type[R]) -> R | None:
    """A function row's stored outcome as ``result`` marked ``replayed``, or None; raises the
    refusals every movement function has (``conflict``: the key names another request,
    ``not_found``: no such account)."""
    if row.status == "replay":
        return result(**{**row.response, "replayed": True})
    if row.status == "conflict":
        raise idempotency_conflict()
    if row.status == "not_found":
        raise user_not_found()
    return None


def note_expiries(
    session: Session, user_id: str, reserved: int, tokens: Iterable[int], balances: Iterable[int]
) -> None:
    """The events of the ``expiry`` entries a function wrote (grants.expire_grant's): each
    grant's tokens and the balance after it."""
    for expired, balance in zip(tokens, balances, strict=True):
        note_balance_change(
            session,
            user_id=user_id,
            balance=int(balance),
            tokens_reserved=reserved,
            operation="expiry",
        )
        note_grants_expired(session, grants=1, tokens=int(expired))
