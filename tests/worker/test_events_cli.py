"""``tokens events tail|dead|replay``."""

from __future__ import annotations

import json
from datetime import timedelta

from click.testing import CliRunner
from sqlalchemy.orm import Session

from accounting import accounts, movements, outbox
from worker.cli import main


def lines(*args: str) -> list[dict[str, object]]:
    result = CliRunner().invoke(main, ["events", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_tail_prints_every_event_from_a_cursor(session: Session) -> None:
    accounts.open_account(session, "u1", initial_balance=10)
    movements.debit(session, "u1", 3, "image_generation")
    session.commit()
    printed = lines("tail")
    assert [(e["type"], e["seq"]) for e in printed] == [
        ("balance.changed", 1),
        ("balance.changed", 2),
    ]
    assert lines("tail", "--user", "nobody") == []
    first = outbox.list_events(session, None, 1, None).next
    assert [e["seq"] for e in lines("tail", "--after", first)] == [2]


def test_dead_lists_what_the_webhook_gave_up_on_and_replay_makes_it_pending(
    session: Session,
) -> None:
    accounts.open_account(session, "u1", initial_balance=10)
    session.commit()
    event = outbox.list_events(session, None, 10, None).events[0]
    gone = outbox.webhook_failed(
        session, int(event.event_id), "HTTP 500", timedelta(seconds=1), timedelta(0)
    )
    assert gone
    [dead] = lines("dead")
    assert (dead["event_id"], dead["error"], dead["attempts"]) == (event.event_id, "HTTP 500", 1)
    result = CliRunner().invoke(main, ["events", "replay", event.event_id])
    assert json.loads(result.stdout) == {"replayed": 1}
    assert lines("dead") == []
    assert [s.event.event_id for s in outbox.webhook_window(session, 10)] == [event.event_id]
    assert CliRunner().invoke(main, ["events", "replay"]).exit_code == 2
