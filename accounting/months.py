"""The ledger's months: ``ledger_entries`` and ``entry_grants`` are partitioned by UTC month of
``created_at`` (migration 0036), and ``events`` by month of ``at`` under the same months (0040).
Months are made ahead (``tokens_ledger_months``, the events' with the ledger's) and a prune drops
the ledger's wholly before its cutoff (``tokens_prune_months``); both live in sql/ledger/. The
events' months are dropped by ``events.prune`` (``accounting.outbox``)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import text
from sqlalchemy.orm import Session

from models.schemas import Month, MonthsOut

# How far ahead the months are made: the worker does it as it starts and beat daily, so an
# entry finds its month even after weeks without either.
MONTHS_AHEAD = 3


def make_months(session: Session, months_ahead: int = MONTHS_AHEAD) -> list[str]:
    """Make the months up to the one ``months_ahead`` from now (by the database's clock); the
    suffixes made (``YYYY_MM``), none when they exist."""
    made = session.execute(
        text("SELECT tokens_ledger_months(now() + make_interval(months => :n))"),
        {"n": months_ahead},
    ).scalar_one()
    return list(made)


def keep_ahead(session: Session, months_ahead: int = MONTHS_AHEAD) -> MonthsOut:
    """:func:`make_months`, and where that leaves the ledger: the end of its newest month and
    the entries past it (in the partition ``after``: stamped by a clock far ahead)."""
    made = make_months(session, months_ahead)
    until, outside = session.execute(
        text(
            "SELECT (SELECT max(upper) FROM tokens_ledger_partitions()),"
            " (SELECT count(*) FROM ledger_entries_after)"
        )
    ).one()
    return MonthsOut(made=made, until=until, outside=outside)


def months(session: Session) -> list[Month]:
    """The ledger's partitions, oldest first, with the entries each holds (an estimate from
    the planner's statistics: counting would read them all)."""
    rows = session.execute(
        text(
            "SELECT p.name, p.lower, p.upper, greatest(c.reltuples, 0)::bigint AS entries"
            " FROM tokens_ledger_partitions() p JOIN pg_class c ON c.relname = p.name"
            " AND c.relnamespace = 'public'::regnamespace"
        )
    ).all()
    return [Month(name=r.name, lower=r.lower, upper=r.upper, entries=r.entries) for r in rows]


def drop_old_months(session: Session, older_than: datetime) -> tuple[list[str], int]:
    """Drop the months wholly before ``older_than`` (and now), each user's entries there
    replaced by one carried_forward entry: the partitions dropped and the entries they held.
    Commit it at once: the drop holds the ledger's tables exclusively until then."""
    row = session.execute(
        text("SELECT * FROM tokens_prune_months(:cutoff, :older_than)"),
        {"cutoff": older_than, "older_than": older_than.isoformat()},
    ).one()
    return list(row.dropped), int(row.deleted)
