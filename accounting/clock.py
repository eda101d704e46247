"""One clock: every timestamp the ledger writes comes from the database, never a worker's clock.

Workers' clocks drift apart; the database's is one. A movement takes its time inside the
statement that changes the account row, after the row lock is granted, and never earlier than
the account's previous change (``stamp``), so for each user the entries in ``created_at`` order
(ties by ``id``) are exactly the order they were applied, whatever the workers' clocks say.

The embedded SQLite default runs on the worker's own host, so there the database's clock and the
worker's are the same clock; SQLite has no per-statement clock function that SQLAlchemy reads
back as a timezone-aware value, so the time is bound from Python and stamped the same way.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, bindparam, func, select
from sqlalchemy.orm import Session

from models.tables import UTCDateTime, utcnow


def is_postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


def now_sql(session: Session) -> ColumnElement[datetime]:
    """The database's current time as an SQL expression, evaluated where it is used.

    On PostgreSQL ``clock_timestamp()``: the time the row is written, not the start of the
    transaction or statement (which may have waited for a lock meanwhile).
    """
    if is_postgres(session):
        return func.clock_timestamp(type_=UTCDateTime())
    return bindparam("clock_now", utcnow(), type_=UTCDateTime())


def stamp(session: Session, previous: Any) -> ColumnElement[datetime]:
    """``now_sql`` but never before ``previous`` (a column holding the last change's time):
    the per-user clock that orders a user's entries even if the server's clock steps back."""
    if is_postgres(session):
        return func.greatest(now_sql(session), previous, type_=UTCDateTime())
    # SQLite stores UTC as text of one fixed format, so max() of the two orders correctly.
    return func.max(now_sql(session), previous, type_=UTCDateTime())


def db_now(session: Session) -> datetime:
    """The database's current time, read once (for decisions such as a renewal cutoff)."""
    value: datetime = session.execute(select(now_sql(session))).scalar_one()
    return value
