"""The events relay through real worker processes: published as Celery tasks in order, one relay
at a time, taken over when its worker dies, and at least once when killed between a publish and
its record (the same event_id again)."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis
from sqlalchemy import text
from sqlalchemy.engine import make_url

from accounting import accounts, movements
from tests.polling import wait_for
from tests.support import WorkerProcess, run_in_threads, running_workers
from tests.worker.tcp_proxy import TcpProxy
from worker.db import get_engine, session_scope
from worker.relay import LOCK_KEY
from worker.settings import get_settings

TASK = "producer.on_event"


class EventQueue:
    """The events queue, read straight from Redis as a producer's worker would take it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.client = redis.Redis.from_url(get_settings().broker)
        self.received: list[dict[str, Any]] = []

    def drain(self) -> list[dict[str, Any]]:
        while (raw := self.client.rpop(self.name)) is not None:
            envelope = json.loads(cast(bytes, raw))
            assert envelope["headers"]["task"] == TASK
            _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            self.received.append(kwargs)
        return self.received

    def ids(self) -> list[str]:
        return [e["event_id"] for e in self.drain()]


@pytest.fixture
def events_queue(clean_db: None) -> Iterator[EventQueue]:
    queue = EventQueue(f"events-{uuid.uuid4().hex[:8]}")
    yield queue
    queue.client.delete(queue.name)


def relay_worker(
    name: str, queue: EventQueue, include: str | None = None, **env: str
) -> WorkerProcess:
    return WorkerProcess(
        f"{name}-{os.getpid()}",
        concurrency=1,
        queues=f"idle-{uuid.uuid4().hex[:8]}",  # serves no task of the run
        env={"TOKENS_EVENTS_TASK": TASK, "TOKENS_EVENTS_QUEUE": queue.name, **env},
        include=include,
    )


def written() -> list[str]:
    with get_engine().connect() as conn:
        return [str(i) for i in conn.execute(text("SELECT id FROM events ORDER BY id")).scalars()]


def relays_holding_the_lock() -> int:
    with get_engine().connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                    " AND database = (SELECT oid FROM pg_database"
                    "                 WHERE datname = current_database())"
                    " AND (classid::bigint << 32 | objid::bigint) = :k"
                ),
                {"k": LOCK_KEY},
            ).scalar_one()
        )


def move(users: list[str], rounds: int) -> None:
    for n in range(rounds):
        for user in users:
            with session_scope() as session:
                if n % 3 == 2:
                    movements.credit(session, user, 3)
                else:
                    movements.debit(session, user, 2, "image_generation")


def opened(users: list[str]) -> None:
    for user in users:
        with session_scope() as session:
            accounts.open_account(session, user, initial_balance=1000)


def in_seq_order(received: list[dict[str, Any]]) -> None:
    last: dict[str, int] = {}
    for e in received:
        assert e["seq"] > last.get(e["user_id"], 0), f"{e['user_id']}: seq {e['seq']} late"
        last[e["user_id"]] = e["seq"]


def test_events_are_published_in_order_by_one_relay_that_a_standby_replaces(
    events_queue: EventQueue, app: Any
) -> None:
    users = ["a", "b", "c"]
    opened(users)
    first, second = relay_worker("relay1", events_queue), relay_worker("relay2", events_queue)
    with running_workers(app, first, second):
        move(users, 10)
        wait_for(lambda: len(events_queue.ids()) >= len(written()), 30, "every event published")
        assert sorted(events_queue.ids(), key=int) == written()
        assert relays_holding_the_lock() == 1
        in_seq_order(events_queue.drain())
        assert events_queue.drain()[0]["data"]["operation_type"] == "adjustment"
        # The active relay's worker dies: the other takes over within seconds.
        holder = first if "events relay: active" in first.log_path.read_text() else second
        holder.kill()
        started = time.monotonic()
        move(users, 3)
        wait_for(lambda: len(events_queue.ids()) >= len(written()), 30, "the standby publishing")
        took = time.monotonic() - started
        assert took < 10, f"taken over after {took:.1f}s"
        assert sorted(set(events_queue.ids()), key=int) == written()


def test_a_relay_killed_between_publish_and_record_publishes_again_with_the_same_ids(
    events_queue: EventQueue, app: Any, tmp_path: Path
) -> None:
    users = ["a", "b"]
    opened(users)
    move(users, 5)
    paused = tmp_path / "paused"
    stuck = relay_worker(
        "stuck",
        events_queue,
        TOKENS_TEST_RELAY_PAUSED=str(paused),
        include="tests.worker.relay_pause",
    )
    with running_workers(app, stuck):
        wait_for(paused.exists, 30, "the relay pausing after a publish")
        first_time = events_queue.ids()
        assert sorted(first_time, key=int) == written()
        assert stuck.proc is not None
        os.killpg(stuck.proc.pid, signal.SIGKILL)  # before it recorded what it published
        stuck.proc.wait(10)
    move(users, 2)
    with running_workers(app, relay_worker("after", events_queue)):
        wait_for(lambda: len(events_queue.ids()) >= 2 * len(first_time) + 4, 30, "republished")
    again = events_queue.ids()[len(first_time) :]
    assert again[: len(first_time)] == first_time  # the same events, the same ids, in order
    assert sorted(set(again), key=int) == written()


def active_relay_pid() -> int | None:
    """The worker process whose relay holds the lock (its connection is named after it)."""
    with get_engine().connect() as conn:
        name = conn.execute(
            text(
                "SELECT a.application_name FROM pg_locks l"
                " JOIN pg_stat_activity a ON a.pid = l.pid"
                " WHERE l.locktype = 'advisory' AND l.granted"
                " AND (l.classid::bigint << 32 | l.objid::bigint) = :k"
                " AND a.datname = current_database()"
            ),
            {"k": LOCK_KEY},
        ).scalar_one_or_none()
    return int(name.rsplit("-", 1)[1]) if name else None


MOVEMENTS = int(os.environ.get("TOKENS_TEST_RELAY_SOAK_MOVEMENTS", "2000"))


def test_no_event_is_lost_while_the_active_relay_is_killed_every_second(
    events_queue: EventQueue, app: Any
) -> None:
    users = [f"u{i}" for i in range(20)]
    opened(users)
    pool = [relay_worker(f"soak{i}", events_queue) for i in range(3)]
    kills = 0
    with running_workers(app, *pool):
        done = threading.Event()

        def movers() -> None:
            # At least MOVEMENTS, and on until three relays were killed meanwhile.
            try:
                rounds = 0
                while rounds * 10 * len(users) < MOVEMENTS or kills < 3:
                    run_in_threads(4, lambda t: move(users[t::4], 10))
                    rounds += 1
            finally:
                done.set()

        mover = threading.Thread(target=movers)
        mover.start()
        while not done.is_set():
            time.sleep(1)
            pid = active_relay_pid()
            victim = next((w for w in pool if w.proc and w.proc.pid == pid), None)
            if victim is not None:
                victim.kill()
                kills += 1
                victim.start()  # back as a standby (ready in a few seconds)
            events_queue.drain()
        mover.join()
        wait_for(
            lambda: set(events_queue.ids()) >= set(written()), 120, "every event, after the kills"
        )
    received = events_queue.ids()
    print(f"{len(written())} events, {kills} relays killed, {len(received)} deliveries")
    assert set(received) == set(written())
    assert len(written()) >= MOVEMENTS
    assert kills >= 3, f"only {kills} relays killed"
    in_seq_order_but_for_replays(events_queue.drain())


def in_seq_order_but_for_replays(received: list[dict[str, Any]]) -> None:
    """Per user, each first delivery comes after the user's earlier ones; a replay (the same
    id again, after a relay died) may repeat what came before."""
    last: dict[str, int] = {}
    for e in received:
        assert e["seq"] <= last.get(e["user_id"], 0) + 1, f"{e['user_id']}: a seq skipped"
        last[e["user_id"]] = max(last.get(e["user_id"], 0), e["seq"])


def test_every_event_arrives_across_a_database_outage_and_a_broker_outage(
    events_queue: EventQueue, app: Any
) -> None:
    """The relay's database and broker both reached through proxies that are cut for a while
    (connections reset, new ones refused), movements going on meanwhile."""
    db = make_url(get_settings().db_url)
    broker = make_url(get_settings().broker)
    db_proxy = TcpProxy((db.host or "127.0.0.1", db.port or 5432))
    broker_proxy = TcpProxy((broker.host or "127.0.0.1", broker.port or 6379))
    db_proxy.open()
    broker_proxy.open()
    users = ["a", "b", "c"]
    opened(users)
    relay = relay_worker(
        "outages",
        events_queue,
        TOKENS_DATABASE_URL=db.set(host="127.0.0.1", port=db_proxy.port).render_as_string(
            hide_password=False
        ),
        TOKENS_BROKER_URL=str(broker.set(host="127.0.0.1", port=broker_proxy.port)),
    )
    try:
        with running_workers(app, relay):
            move(users, 3)
            wait_for(lambda: len(events_queue.ids()) >= len(written()), 30, "before the outages")
            for proxy in (db_proxy, broker_proxy):
                proxy.cut()
                move(users, 3)
                time.sleep(3)
                proxy.open()
            wait_for(
                lambda: set(events_queue.ids()) >= set(written()), 60, "every event, after them"
            )
        assert set(events_queue.ids()) == set(written())
        in_seq_order_but_for_replays(events_queue.drain())
    finally:
        db_proxy.close()
        broker_proxy.close()
