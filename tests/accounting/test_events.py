"""The events outbox over a real PostgreSQL: one event per entry and per crossing, written in
the change's transaction, per-user seq without gaps; alerts and auto top-up; the pull cursor."""

from __future__ import annotations

import threading
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting import accounts, alerts, ledger, movements, outbox, reservations
from accounting.errors import DomainError
from tests.support import attempt, refused, run_in_threads
from worker.db import get_engine, session_scope


def opened(session: Session, user_id: str = "u1", balance: int = 100) -> None:
    accounts.open_account(session, user_id, initial_balance=balance)
    session.commit()


def events(session: Session, user_id: str | None = None) -> list[dict[str, Any]]:
    """Every event, by pulling from the start (numbers what committed)."""
    found: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = outbox.list_events(session, cursor, 1000, user_id)
        found += [e.model_dump(mode="json") for e in page.events]
        if page.next == cursor or not page.events:
            return found
        cursor = page.next


def seqs_gap_free(found: list[dict[str, Any]]) -> None:
    per_user: dict[str, list[int]] = {}
    for e in found:
        per_user.setdefault(e["user_id"], []).append(e["seq"])
    for user, seqs in per_user.items():
        assert seqs == list(range(1, len(seqs) + 1)), f"{user}: {seqs}"


def test_every_entry_writes_balance_changed_with_the_entry_as_user_entries_shows_it(
    session: Session,
) -> None:
    opened(session, balance=100)
    movements.debit(session, "u1", 30, "image_generation", metadata={"k": "v"})
    movements.credit(session, "u1", 5)
    session.commit()
    found = events(session)
    assert [(e["type"], e["seq"]) for e in found] == [
        ("balance.changed", 1),
        ("balance.changed", 2),
        ("balance.changed", 3),
    ]
    shown = ledger.user_entries(session, "u1").model_dump(mode="json")["entries"]
    assert [e["data"] for e in found] == list(reversed(shown))
    assert all(e["at"] == e["data"]["created_at"] for e in found)
    assert len({e["event_id"] for e in found}) == 3


def test_a_refused_movement_writes_no_event(session: Session) -> None:
    opened(session, balance=10)
    assert isinstance(attempt(movements.debit, "u1", 50, "image_generation"), DomainError)
    assert len(events(session)) == 1


def test_a_hold_crossing_a_threshold_and_its_release_alert_once_each(session: Session) -> None:
    opened(session, balance=100)
    alerts.set_alerts(session, "u1", [50, 20])
    session.commit()
    held = reservations.reserve(session, "u1", amount=60)  # available 100 -> 40: below 50
    session.commit()
    reservations.release(session, held.reservation_id)  # 40 -> 100: recovered 50
    session.commit()
    found = [(e["type"], e["data"]) for e in events(session) if e["type"] != "balance.changed"]
    assert found == [
        ("balance.low", {"threshold": 50, "tokens_available": 40}),
        ("balance.recovered", {"threshold": 50, "tokens_available": 100}),
    ]


def test_a_fall_through_two_thresholds_alerts_both_highest_first_after_the_entry(
    session: Session,
) -> None:
    opened(session, balance=100)
    alerts.set_alerts(session, "u1", [20, 50])
    session.commit()
    movements.debit(session, "u1", 90, "image_generation")
    session.commit()
    found = [(e["type"], e["seq"], e["data"].get("threshold")) for e in events(session)]
    assert found[1:] == [
        ("balance.changed", 2, None),
        ("balance.low", 3, 50),
        ("balance.low", 4, 20),
    ]


def test_concurrent_debits_around_a_threshold_cross_it_exactly_once_each_way(
    session: Session,
) -> None:
    opened(session, balance=520)
    alerts.set_alerts(session, "u1", [500])
    session.commit()

    def move(i: int) -> None:
        for n in range(10):
            if (i + n) % 2:
                attempt(movements.credit, "u1", 37)
            else:
                attempt(movements.debit, "u1", 41, "image_generation", allow_overdraft=True)

    run_in_threads(6, move)
    found = events(session)
    seqs_gap_free(found)
    # Replay the entries in seq order: each alert must be exactly the crossings they made.
    expected: list[tuple[str, int]] = []
    seen: list[tuple[str, int]] = []
    available = None
    for e in found[1:]:  # after the opening entry (alerts were set once it was made)
        if e["type"] == "balance.changed":
            before, available = e["data"]["balance_before"], e["data"]["balance_after"]
            if before >= 500 > available:
                expected.append(("balance.low", available))
            elif before < 500 <= available:
                expected.append(("balance.recovered", available))
        else:
            seen.append((e["type"], e["data"]["tokens_available"]))
    assert seen == expected
    assert expected, "the race never crossed the threshold"


def test_auto_topup_one_outstanding_fulfilled_by_its_key_and_capped(session: Session) -> None:
    opened(session, balance=100)
    alerts.set_auto_topup(session, "u1", below=50, amount=200, max_per_month=2)
    session.commit()
    movements.debit(session, "u1", 60, "image_generation")  # 40 < 50: a request
    movements.debit(session, "u1", 10, "image_generation")  # still outstanding: none
    session.commit()
    requests = [e for e in events(session) if e["type"] == "topup.requested"]
    assert len(requests) == 1
    key = requests[0]["data"]["idempotency_key"]
    assert requests[0]["data"]["amount"] == 200
    movements.credit(session, "u1", 5, idempotency_key=key)  # fulfils it, but 35 < 50: another
    session.commit()
    movements.credit(session, "u1", 5, idempotency_key=key)  # a replay: nothing
    session.commit()
    movements.debit(session, "u1", 1, "image_generation")  # outstanding again: none
    session.commit()
    requests = [e for e in events(session) if e["type"] == "topup.requested"]
    assert len(requests) == 2 and requests[1]["data"]["idempotency_key"] != key
    movements.credit(session, "u1", 1, idempotency_key=requests[1]["data"]["idempotency_key"])
    session.commit()  # fulfilled; still below, but 2 this month: capped
    assert len([e for e in events(session) if e["type"] == "topup.requested"]) == 2


def test_a_topup_request_lapses_after_24_hours(session: Session) -> None:
    opened(session, balance=100)
    alerts.set_auto_topup(session, "u1", below=50, amount=10)
    session.commit()
    movements.debit(session, "u1", 60, "image_generation")
    session.commit()
    session.execute(
        text("UPDATE event_alerts SET topup_requested_at = topup_requested_at - interval '25h'")
    )
    session.commit()
    movements.debit(session, "u1", 1, "image_generation")
    session.commit()
    assert len([e for e in events(session) if e["type"] == "topup.requested"]) == 2


def test_the_cursor_misses_no_event_of_a_transaction_that_commits_late(session: Session) -> None:
    """The outbox gap: a transaction writes its event (a lower id) and stays open while later
    ones commit and a consumer pages past them. Its event must still come, after them."""
    for user in ("slow", "fast"):
        opened(session, user, 100)
    after = outbox.list_events(session, None, 1000, None).next
    held_open = threading.Event()
    release = threading.Event()

    def slow() -> None:
        with session_scope() as s:
            movements.debit(s, "slow", 1, "image_generation")
            held_open.set()
            release.wait(10)

    thread = threading.Thread(target=slow)
    thread.start()
    assert held_open.wait(10)
    movements.debit(session, "fast", 1, "image_generation")
    session.commit()
    page = outbox.list_events(session, after, 1000, None)
    assert [e.user_id for e in page.events] == ["fast"]
    release.set()
    thread.join()
    late = outbox.list_events(session, page.next, 1000, None)
    assert [e.user_id for e in late.events] == ["slow"]
    assert outbox.list_events(session, late.next, 1000, None).next == late.next


def test_a_cursor_consumer_sees_every_event_once_under_concurrent_commits_held_open(
    session: Session,
) -> None:
    users = [f"u{i}" for i in range(6)]
    for user in users:
        opened(session, user, 10**6)
    start = outbox.list_events(session, None, 1000, None).next
    stop = threading.Event()
    seen: list[str] = []

    def consume() -> None:
        cursor = start
        while True:
            # Read before the call: an empty page then means nothing committed before the
            # movers were done is left.
            done = stop.is_set()
            with session_scope() as s:
                page = outbox.list_events(s, cursor, 50, None)
            seen.extend(e.event_id for e in page.events)
            cursor = page.next
            if done and not page.events:
                return

    def move(i: int) -> None:
        for n in range(15):
            with session_scope() as s:
                movements.debit(s, users[i], 1, "image_generation")
                if n % 5 == i % 5:
                    time.sleep(0.5 + i * 0.2)  # held open while others commit and are read

    consumer = threading.Thread(target=consume)
    consumer.start()
    run_in_threads(len(users), move)
    stop.set()
    consumer.join(60)
    with get_engine().connect() as conn:
        written = conn.execute(text(f"SELECT id FROM events WHERE pos > {start}")).scalars().all()
    assert sorted(map(int, seen)) == sorted(written)
    assert len(seen) == len(set(seen)) == len(users) * 15


def test_prune_keeps_recent_events_and_those_a_push_channel_has_yet_to_deliver(
    session: Session,
) -> None:
    opened(session, balance=100)
    for _ in range(3):
        movements.debit(session, "u1", 1, "image_generation")
    session.commit()
    found = events(session)
    session.execute(text("UPDATE events SET at = at - interval '8 days' WHERE seq <= 3"))
    session.commit()
    third = outbox.list_events(session, None, 3, None).next
    outbox.channel_done(session, outbox.CELERY, int(third) - 1)  # the third not sent yet
    outbox.webhook_delivered(session, [int(e["event_id"]) for e in found[:1]])
    assert outbox.prune(session, 7, celery=True, webhook=True) == 1  # the first: old, sent, posted
    assert outbox.prune(session, 7, celery=True, webhook=False) == 1  # the second
    assert outbox.prune(session, 7, celery=False, webhook=False) == 1  # the third
    assert [e["seq"] for e in events(session)] == [4]  # recent
    # seq goes on from the account's counter, not from what is left
    movements.debit(session, "u1", 1, "image_generation")
    session.commit()
    assert [e["seq"] for e in events(session)] == [4, 5]


def test_alerts_and_top_ups_belong_to_the_pool_not_its_members(session: Session) -> None:
    opened(session, "pool", balance=100)
    accounts.open_account(session, "member", parent_id="pool")
    session.commit()
    message = "Account is a member of pool: move tokens on the pool"
    for refusal in (
        refused(session, alerts.set_alerts, "member", [10]),
        refused(session, alerts.set_auto_topup, "member", 10, 5),
    ):
        assert (refusal.code, refusal.message) == ("MEMBER_ACCOUNT", message)
    alerts.set_alerts(session, "pool", [50])
    session.commit()
    movements.debit(session, "member", 60, "image_generation")  # the pool's tokens, its events
    session.commit()
    found = [(e["user_id"], e["type"], e["seq"]) for e in events(session)]
    assert found[-2:] == [("pool", "balance.changed", 2), ("pool", "balance.low", 3)]
