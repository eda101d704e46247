"""``tokens events``: follow the events, and the webhook's dead ones (list, deliver again)."""

from __future__ import annotations

import json
import time

import click

from worker.cli.group import emit, main, ready


@main.group()
def events() -> None:
    """Events (contract v1.2): the outbox every change writes."""


def _line(data: object) -> None:
    click.echo(json.dumps(data, separators=(",", ":"), ensure_ascii=False))


@events.command()
@click.option("--after", metavar="CURSOR", help="Start after this cursor (default: the oldest).")
@click.option("--user", "user_id", metavar="USER_ID", help="Only this account's events.")
@click.option("--follow", "-f", is_flag=True, help="Keep waiting for new events (Ctrl-C stops).")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
def tail(after: str | None, user_id: str | None, follow: bool, limit: int) -> None:
    """Print events as events.list gives them, one JSON object a line; then the cursor to resume
    from (on stderr)."""
    from accounting import outbox
    from worker.db import session_scope

    ready()
    cursor = after
    try:
        while True:
            with session_scope() as session:
                page = outbox.list_events(session, cursor, limit, user_id)
            for event in page.events:
                _line(event.model_dump(mode="json"))
            cursor = page.next
            if not page.events:
                if not follow:
                    break
                time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    click.echo(f"next: {cursor}", err=True)


@events.command()
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
def dead(limit: int) -> None:
    """The events the webhook gave up on (oldest first), each with when and its last error."""
    from accounting import outbox
    from worker.db import session_scope

    ready()
    with session_scope() as session:
        for stored, dead_at, error in outbox.dead(session, limit):
            _line(
                {
                    **stored.event.model_dump(mode="json"),
                    "dead_at": dead_at.isoformat(),
                    "attempts": stored.attempts,
                    "error": error,
                }
            )


@events.command()
@click.argument("event_ids", nargs=-1, type=click.IntRange(min=1))
@click.option("--all", "every", is_flag=True, help="Every dead event.")
def replay(event_ids: tuple[int, ...], every: bool) -> None:
    """Deliver dead events again by webhook (their attempts start over)."""
    from accounting import outbox
    from worker.db import session_scope

    if bool(event_ids) == every:
        raise click.UsageError("name the events to replay, or give --all")
    ready()
    with session_scope() as session:
        emit({"replayed": outbox.replay(session, list(event_ids) or None)})
