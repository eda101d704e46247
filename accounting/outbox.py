"""The events outbox, read: events as the contract shows them, the pull cursor, and each push
channel's progress. The events themselves are written in the database, in the transaction of the
change they report (``sql/events/``); nothing here writes one.

The cursor is an event's ``pos``, its place in one global order given only after the event's
transaction committed (``tokens_events_number``, one numbering transaction at a time). A
sequence value taken at insert would not do: a transaction that took 7 and commits after the one
that took 8 would let a reader holding "8" skip 7 for ever (the outbox gap). Numbers given after
commit never land behind a number already visible, so paging by ``pos`` skips nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting.ledger import entry_out
from models.schemas import EntrySplit
from token_worker_client.events import EventOut, EventsOut

#: How many committed events one numbering pass gives a place to.
NUMBER_BATCH = 5000
BALANCE_CHANGED = "balance.changed"

# A balance.changed event's `at` is its entry's created_at, which the splits are partitioned by.
_COLUMNS = """
    e.id, e.user_id, e.seq, e.type, e.at, e.data, e.pos, e.webhook_attempts, e.webhook_next_at,
    (SELECT json_agg(json_build_array(eg.grant_id, eg.amount) ORDER BY eg.seq)
     FROM entry_grants eg WHERE eg.entry_id = e.entry_id AND eg.created_at = e.at) AS splits
"""


@dataclass(frozen=True)
class Stored:
    """An event as read, with its place, its webhook attempts so far and when the next is due."""

    event: EventOut
    pos: int
    attempts: int
    retry_at: datetime | None


def number(session: Session, limit: int = NUMBER_BATCH) -> int:
    """Give committed events their place (and commit: only a committed number may be read)."""
    numbered = int(
        session.execute(text("SELECT tokens_events_number(:n)"), {"n": limit}).scalar_one()
    )
    session.commit()
    return numbered


def _entry(raw: dict[str, Any], splits: list[list[Any]] | None) -> dict[str, Any]:
    """A ledger row as the trigger stored it (``to_jsonb``), as ``ledger.user_entries`` shows
    it (rendered there by ``tokens_page``; tests/accounting/test_events.py holds the two
    equal)."""
    row = SimpleNamespace(**{**raw, "created_at": datetime.fromisoformat(raw["created_at"])})
    split = [EntrySplit(grant_id=str(g), amount=int(a)) for g, a in splits or ()]
    return entry_out(row, split).model_dump(mode="json")


def _stored(row: Any) -> Stored:
    data = _entry(row.data, row.splits) if row.type == BALANCE_CHANGED else row.data
    event = EventOut(
        event_id=str(row.id), type=row.type, user_id=row.user_id, seq=row.seq, at=row.at, data=data
    )
    return Stored(event, int(row.pos), int(row.webhook_attempts), row.webhook_next_at)


def after(session: Session, pos: int, limit: int, user_id: str | None = None) -> list[Stored]:
    """Numbered events after ``pos``, in order (one user's, with ``user_id``)."""
    where = "e.pos > :pos" + (" AND e.user_id = :user_id" if user_id is not None else "")
    rows = session.execute(
        text(f"SELECT {_COLUMNS} FROM events e WHERE {where} ORDER BY e.pos LIMIT :limit"),
        {"pos": pos, "limit": limit, "user_id": user_id},
    ).all()
    return [_stored(r) for r in rows]


def list_events(session: Session, cursor: str | None, limit: int, user_id: str | None) -> EventsOut:
    """``events.list``: what follows ``cursor``; ``next`` is the last one's place (or the cursor
    given, when nothing follows)."""
    number(session)
    start = int(cursor) if cursor is not None else 0
    page = after(session, start, limit, user_id)
    following = str(page[-1].pos) if page else (cursor if cursor is not None else "0")
    return EventsOut(events=[s.event for s in page], next=following)


# --- the push channels ------------------------------------------------------------------------

CELERY = "celery"


def channel_pos(session: Session, name: str) -> int:
    """Where channel ``name`` is: every event up to this place delivered (0 when new)."""
    found = session.execute(
        text("SELECT pos FROM event_channels WHERE name = :name"), {"name": name}
    ).scalar_one_or_none()
    return int(found) if found is not None else 0


def channel_done(session: Session, name: str, pos: int) -> None:
    session.execute(
        text(
            "INSERT INTO event_channels (name, pos) VALUES (:name, :pos)"
            " ON CONFLICT (name) DO UPDATE SET pos = GREATEST(event_channels.pos, :pos)"
        ),
        {"name": name, "pos": pos},
    )
    session.commit()


def webhook_window(session: Session, limit: int) -> list[Stored]:
    """The oldest events the webhook has yet to deliver (not dead), in order. Whether each is
    due is the caller's: one user's first is its head, and nothing of that user may pass it."""
    rows = session.execute(
        text(
            f"SELECT {_COLUMNS} FROM events e"
            " WHERE e.pos IS NOT NULL AND e.webhook_done_at IS NULL AND e.webhook_dead_at IS NULL"
            " ORDER BY e.pos LIMIT :limit"
        ),
        {"limit": limit},
    ).all()
    return [_stored(r) for r in rows]


def webhook_delivered(session: Session, event_ids: list[int]) -> None:
    session.execute(
        text(
            "UPDATE events SET webhook_done_at = clock_timestamp(), webhook_next_at = NULL,"
            " webhook_error = NULL WHERE id = ANY(:ids)"
        ),
        {"ids": event_ids},
    )
    session.commit()


def webhook_failed(
    session: Session, event_id: int, error: str, retry_in: timedelta, give_up_after: timedelta
) -> bool:
    """Record a failed attempt: retried after ``retry_in``, or dead once it has failed for
    ``give_up_after``. Whether it is dead now."""
    dead = session.execute(
        text(
            """
            UPDATE events SET
                webhook_attempts = webhook_attempts + 1,
                webhook_error = left(:error, 1000),
                webhook_failing_since = coalesce(webhook_failing_since, clock_timestamp()),
                webhook_next_at = clock_timestamp() + :retry_in,
                webhook_dead_at = CASE
                    WHEN coalesce(webhook_failing_since, clock_timestamp()) + :give_up
                         <= clock_timestamp() THEN clock_timestamp() END
            WHERE id = :id
            RETURNING webhook_dead_at IS NOT NULL
            """
        ),
        {"id": event_id, "error": error, "retry_in": retry_in, "give_up": give_up_after},
    ).scalar_one()
    session.commit()
    return bool(dead)


def dead(session: Session, limit: int = 100) -> list[tuple[Stored, datetime, str | None]]:
    """Events the webhook gave up on, oldest first: each with when, and the last error."""
    rows = session.execute(
        text(
            f"SELECT {_COLUMNS}, e.webhook_dead_at, e.webhook_error FROM events e"
            " WHERE e.webhook_dead_at IS NOT NULL ORDER BY e.pos LIMIT :limit"
        ),
        {"limit": limit},
    ).all()
    return [(_stored(r), r.webhook_dead_at, r.webhook_error) for r in rows]


def replay(session: Session, event_ids: list[int] | None) -> int:
    """Deliver again by webhook: the dead events named (all of them with None) go back to
    pending, their attempts forgotten. How many."""
    where = "webhook_dead_at IS NOT NULL" + (" AND id = ANY(:ids)" if event_ids else "")
    count = session.execute(
        text(
            "UPDATE events SET webhook_dead_at = NULL, webhook_next_at = NULL,"
            " webhook_failing_since = NULL, webhook_attempts = 0 WHERE " + where
        ),
        {"ids": event_ids or []},
    ).rowcount  # type: ignore[attr-defined]
    session.commit()
    return int(count)


# --- retention --------------------------------------------------------------------------------


# What events.prune may remove is one definition, sql/events/tokens_event_done.sql; the months
# wholly past the cutoff that hold nothing else are dropped whole first.
_PRUNE_MONTHS = text(
    "SELECT * FROM tokens_prune_event_months(:cutoff, CAST(:celery_pos AS bigint), :webhook)"
)
_PRUNE_PAGE = text(
    "DELETE FROM events WHERE (id, at) IN (SELECT e.id, e.at FROM events e"
    " WHERE tokens_event_done(e, :cutoff, CAST(:celery_pos AS bigint), :webhook)"
    " ORDER BY e.pos LIMIT :batch)"
)


def prune(session: Session, days: int, celery: bool, webhook: bool, batch: int = 10_000) -> int:
    """Delete events written more than ``days`` ago that every configured push channel has
    delivered (the Celery channel: up to its place; the webhook: each one): the months that
    hold nothing else are dropped whole, the rest go a page at a time. How many went."""
    cutoff = session.execute(
        text("SELECT clock_timestamp() - make_interval(days => :days)"), {"days": days}
    ).scalar_one()
    celery_pos = None
    if celery:
        celery_pos = session.execute(
            text("SELECT coalesce((SELECT pos FROM event_channels WHERE name = :ch), 0)"),
            {"ch": CELERY},
        ).scalar_one()
    args = {"cutoff": cutoff, "celery_pos": celery_pos, "webhook": webhook}
    total = int(session.execute(_PRUNE_MONTHS, args).one().deleted)
    session.commit()
    while True:
        gone = session.execute(_PRUNE_PAGE, {**args, "batch": batch}).rowcount  # type: ignore[attr-defined]
        session.commit()
        total += int(gone)
        if gone < batch:
            return total


@dataclass(frozen=True)
class Backlog:
    """What the push channels have yet to deliver: how many events, and the oldest one's age."""

    pending: int
    oldest_seconds: float


def backlog(session: Session, celery: bool, webhook: bool) -> Backlog:
    """Events not yet delivered by some configured push channel (numbered or not); none without
    a push channel (pulled events are the consumer's to fetch)."""
    if not (celery or webhook):
        return Backlog(0, 0.0)
    undelivered = ["e.pos IS NULL"]
    if celery:
        undelivered.append("e.pos > coalesce((SELECT pos FROM event_channels WHERE name = :ch), 0)")
    if webhook:
        undelivered.append("(e.webhook_done_at IS NULL AND e.pos IS NOT NULL)")
    row = session.execute(
        text(
            "SELECT count(*), coalesce(extract(epoch FROM clock_timestamp() - min(e.at)), 0)"
            " FROM events e WHERE " + " OR ".join(undelivered)
        ),
        {"ch": CELERY},
    ).one()
    return Backlog(int(row[0]), float(row[1]))
