"""One clock: every timestamp the ledger writes comes from the database, never a worker's clock.

Workers' clocks drift apart; the database's is one. A movement takes its time inside the
statement that changes the account row, after the row lock is granted, and never earlier than
the account's previous change (``stamp``), so for each user the entries in ``created_at`` order
(ties by ``id``) are exactly the order they were applied, whatever the workers' clocks say.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, func, literal, select
from sqlalchemy.orm import Session

from models.tables import UTCDateTime


def now_sql() -> ColumnElement[datetime]:
    """The database's current time as an SQL expression, evaluated where it is used:
    ``clock_timestamp()``, the time the row is written, not the start of the transaction or
    statement (which may have waited for a lock meanwhile)."""
    return func.clock_timestamp(type_=UTCDateTime())


def stamp(previous: Any) -> ColumnElement[datetime]:
    """``now_sql`` but never before ``previous`` (the column holding the account's last change):
    the per-user clock that keeps a user's entries in order even if the server's clock steps
    back."""
    return func.greatest(now_sql(), previous, type_=UTCDateTime())


def at(session: Session, now: datetime | None) -> ColumnElement[datetime]:
    """``now`` as an SQL value when a caller simulates a moment (tests, tools), else the
    database's clock."""
    if now is None:
        return now_sql()
    return literal(now, type_=UTCDateTime())


def db_now(session: Session) -> datetime:
    """The database's current time, read once (for decisions such as a renewal cutoff)."""
    value: datetime = session.execute(select(now_sql())).scalar_one()
    return value
