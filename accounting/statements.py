"""How the one-statement movements (PostgreSQL functions, migrations 0005 on) are called.

In a caller's transaction (the CLI, tests, a batch's savepoint) a function returns its refusal
as a ``status`` and leaves what it did (the key's claim, expiries) to the caller, whose
transaction rolls back as it would on the portable path.

*Alone* (the session's connection in autocommit: ``worker.db.statement_scope``) the statement is
the whole transaction, one round trip with no BEGIN or COMMIT. It is then filtered through
``tokens_ok()`` (migration 0006), which raises on a refusal so that the statement leaves nothing
behind; the refusal comes back from the error's detail as the row the function returned.
Only a movement that is one statement may run alone: the portable path calls
:func:`need_transaction` first.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from accounting import clock
from accounting.events import note_balance_change, note_grants_expired

# Off: every movement takes the portable Python path (tests compare the two; bench measures).
ENABLED = True

# tokens_ok()'s SQLSTATE for a refusal.
REFUSED = "TKREF"

_texts: dict[tuple[str, bool], TextClause] = {}


def applies(session: Session) -> bool:
    """Whether ``session``'s movements run through the functions (PostgreSQL, unless disabled)."""
    return ENABLED and clock.is_postgres(session)


def alone(session: Session) -> bool:
    """Whether each statement ``session`` runs is its own transaction (autocommit)."""
    options = session.connection().get_execution_options()
    return options.get("isolation_level") == "AUTOCOMMIT"


def need_transaction(session: Session) -> None:
    """Refuse to run a movement of several statements where each would commit on its own."""
    if alone(session):
        raise RuntimeError("this movement is several statements: run it in a transaction")


def call(session: Session, function: str, params: dict[str, Any]) -> Any:
    """``SELECT * FROM <function>`` (a call with named parameters, such as
    ``tokens_spend(:user_id, ...)``): the function's one row, with attribute access. Alone, a
    refusal is the same row, rebuilt from ``tokens_ok()``'s error after the statement rolled
    back (JSON: arrays as lists, ``jsonb`` as dicts, as psycopg returns them)."""
    by_itself = alone(session)
    statement = _texts.get((function, by_itself))
    if statement is None:
        sql = (
            f"SELECT r.* FROM {function} AS r WHERE tokens_ok(to_jsonb(r))"
            if by_itself
            else f"SELECT * FROM {function}"
        )
        statement = _texts[(function, by_itself)] = text(sql)
    try:
        return session.execute(statement, params).one()
    except DBAPIError as exc:
        if not by_itself or getattr(exc.orig, "sqlstate", None) != REFUSED:
            raise
        detail = exc.orig.diag.message_detail  # type: ignore[union-attr]
        return SimpleNamespace(**json.loads(detail))


def note_expiries(session: Session, user_id: str, row: Any, reserved: int) -> None:
    """The events of the expiries a function made (its ``expired_tokens`` and
    ``expired_balances``), as :func:`accounting.grants.expire_grant` notes them; ``reserved``
    is the account's ``tokens_reserved`` when they were made."""
    for tokens, balance in zip(row.expired_tokens, row.expired_balances, strict=True):
        note_balance_change(
            session,
            user_id=user_id,
            balance=int(balance),
            tokens_reserved=reserved,
            operation="expiry",
        )
        note_grants_expired(session, grants=1, tokens=int(tokens))
