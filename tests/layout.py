"""The ledger's months for a database that has a past: migration 0036 makes one partition for
everything before next month (a new database's is empty) and the months from there, and 0040 the
same for events. A test or a benchmark whose entries span past months replaces that empty first
partition with months."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Connection, text


def month_start(conn: Connection, offset: int, since: datetime | None = None) -> datetime:
    """The first instant of the UTC month ``offset`` months from ``since``'s (now by the
    database's clock)."""
    start: datetime = conn.execute(
        text(
            "SELECT (date_trunc('month', coalesce(:since, now()) AT TIME ZONE 'UTC')"
            " + make_interval(months => :n)) AT TIME ZONE 'UTC'"
        ),
        {"n": offset, "since": since},
    ).scalar_one()
    return start


def months_since(conn: Connection, first: datetime) -> int:
    """Replace the (empty) partition before the first month by one partition per UTC month from
    ``first``'s up to the first month, and a partition before ``first``'s month; how many
    months were made."""
    end = conn.execute(
        text("SELECT upper FROM tokens_ledger_partitions() WHERE name = 'ledger_entries_before'")
    ).scalar_one()
    for table in ("entry_grants", "ledger_entries", "events"):
        conn.execute(text(f"ALTER TABLE {table} DETACH PARTITION {table}_before"))
        conn.execute(text(f"DROP TABLE {table}_before"))
    lower = month_start(conn, 0, first)
    made = 0
    partition = text(
        "SELECT tokens_ledger_partition(:suffix, :bounds),"
        " tokens_events_partition(:suffix, :bounds)"
    )
    conn.execute(partition, {"suffix": "before", "bounds": f"FROM (MINVALUE) TO ('{lower}')"})
    while lower < end:
        upper = month_start(conn, 1, lower)
        bounds = f"FROM ('{lower}') TO ('{upper}')"
        conn.execute(partition, {"suffix": f"{lower:%Y_%m}", "bounds": bounds})
        lower, made = upper, made + 1
    return made
