"""The Redis channel's pop (worker/reliable.py) against a private Redis (AOF, appendfsync always)
killed at the worst moment: the message is taken off its queue and Redis dies before anything
else happens. kombu's channel (BRPOP, then a second command to record the message in
``unacked``) loses it there; ours pops and records in one script, so it is in ``unacked`` and
comes back. Last, the channel's event-loop connections leave the worker's epoll before they close
(a stale entry stopped the worker after a silently dropped broker link).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import kombu as kombu_module
import kombu.asynchronous as kombu_asynchronous
import kombu.transport.redis as kombu_redis
import pytest
from kombu.exceptions import OperationalError
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.servers import PrivateRedis
from worker import reliable
from worker.transport import Transport

kombu: Any = kombu_module  # untyped
hubs: Any = kombu_asynchronous

QUEUE = "q"


@pytest.fixture
def server() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server on the PATH")
    s = PrivateRedis("always").start()
    try:
        yield s
    finally:
        s.destroy()


def publish(server: PrivateRedis, body: dict[str, Any]) -> None:
    with kombu.Connection(f"{server.url}/0") as conn:
        conn.Producer().publish(body, routing_key=QUEUE, declare=[kombu.Queue(QUEUE)])


def where(server: PrivateRedis) -> tuple[int, int]:
    """(messages in the queue, messages in unacked)."""
    client = server.client()
    return int(client.llen(QUEUE)), int(client.hlen("unacked"))


def connection(server: PrivateRedis, transport: type, **options: Any) -> Any:
    return kombu.Connection(
        f"{server.url}/0",
        transport=transport,
        transport_options={"max_retries": 0, **options},
    )


def hold_one(server: PrivateRedis, body: dict[str, Any]) -> tuple[Any, Any]:
    """Publish ``body`` and receive it on a connection of our transport, unacknowledged."""
    publish(server, body)
    held: list[Any] = []
    conn = connection(server, Transport)
    conn.Consumer(kombu.Queue(QUEUE), callbacks=[lambda b, m: held.append(m)]).consume()
    conn.drain_events(timeout=5)
    return conn, held[0]


def deliver_with_redis_killed(server: PrivateRedis, transport: type) -> list[Any]:
    """Consume one message; the moment it is off the queue (the transport's ``_deliver``, before
    the channel records it in kombu and before the consumer sees it), Redis is SIGKILLed. Then
    the consumer's process dies too (what it holds in memory is gone) and Redis restarts."""
    got: list[Any] = []
    conn = connection(server, transport)
    try:
        original = conn.transport._deliver

        def killed_first(message: Any, queue: str) -> None:
            server.kill()
            original(message, queue)

        conn.transport._deliver = killed_first
        with conn.Consumer(kombu.Queue(QUEUE), callbacks=[lambda b, m: got.append(b)]):
            try:
                conn.drain_events(timeout=5)
            except (OperationalError, RedisConnectionError, *conn.connection_errors):
                pass
    finally:
        conn.release()  # Redis is down: nothing can be put back now
        reliable._pending_restore.clear()  # the process dies: so does what it remembered
        server.start()  # the same AOF: what Redis acknowledged before it died
    return got


def test_kombus_pop_loses_the_message_when_redis_dies_after_it(server: PrivateRedis) -> None:
    """The window, shown on kombu's own channel: the test would catch it."""
    publish(server, {"n": 1})
    deliver_with_redis_killed(server, kombu_redis.Transport)
    assert where(server) == (0, 0)  # in no list: lost


def test_our_pop_keeps_the_message_in_unacked_and_it_comes_back(server: PrivateRedis) -> None:
    publish(server, {"n": 1})
    got = deliver_with_redis_killed(server, Transport)
    assert got == [{"n": 1}]  # held by the consumer, never acknowledged
    assert where(server) == (0, 1)

    # The visibility timeout brings it back to a consumer, which acknowledges it.
    received: list[Any] = []
    conn = connection(server, Transport, visibility_timeout=1, unacked_restore_throttle=1)
    with conn, conn.Consumer(kombu.Queue(QUEUE), callbacks=[lambda b, m: received.append(m)]):
        for _ in range(40):
            try:
                conn.drain_events(timeout=0.25)
            except TimeoutError:
                continue
            if received:
                break
        assert [m.payload for m in received] == [{"n": 1}]
        assert received[0].delivery_info.get("redelivered") is True
        received[0].ack()
    assert where(server) == (0, 0)


def test_messages_held_when_redis_died_are_put_back_on_reconnect(server: PrivateRedis) -> None:
    """A channel holding a message it could not put back (Redis down as its connection closed)
    leaves the tag to the next channel, which puts it back at once, not a visibility timeout
    (300 s) later."""
    conn, _ = hold_one(server, {"n": 2})
    assert where(server) == (0, 1)
    server.kill()
    conn.release()  # the channel closes; Redis cannot take the message back now
    server.start()
    assert where(server) == (0, 1)
    with connection(server, Transport) as again:
        again.default_channel  # noqa: B018  (a channel of this process connects)
        assert where(server) == (1, 0)
    assert not reliable._pending_restore


def test_a_refused_envelope_leaves_nothing_in_unacked(server: PrivateRedis) -> None:
    """Recorded by the script, then refused by the transport (an encoding kombu cannot decode):
    the refusal is final, so the record goes too."""
    task_id = str(uuid.uuid4())
    envelope = {
        "body": base64.b64encode(b"[[], {}, {}]").decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"id": task_id, "task": "tokens.debit"},
        "properties": {
            "body_encoding": "rot13",
            "delivery_tag": str(uuid.uuid4()),
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
        },
    }
    server.client().lpush(QUEUE, json.dumps(envelope))
    got: list[Any] = []
    with (
        connection(server, Transport) as conn,
        conn.Consumer(kombu.Queue(QUEUE), callbacks=[lambda b, m: got.append(b)]),
        contextlib.suppress(TimeoutError),
    ):
        conn.drain_events(timeout=1)
    assert got == []
    assert where(server) == (0, 0)


def test_a_late_ack_after_a_reconnect_settles_the_message(server: PrivateRedis) -> None:
    """A task running when the broker connection dropped finishes after the reconnect and acks
    its message on the closed channel. kombu reached Redis through the closed channel there
    (AttributeError: Celery's consumer stopped for good). Here the ack settles the message:
    not put back by the next channel, gone from unacked."""
    conn, message = hold_one(server, {"n": 3})
    server.kill()
    conn.release()  # the channel closes, the message kept to be put back
    server.start()
    message.ack()
    assert where(server) == (0, 0)
    with connection(server, Transport) as again:
        again.default_channel  # noqa: B018  (nothing left to put back)
        assert where(server) == (0, 0)


def test_a_late_ack_on_a_cleanly_closed_channel(server: PrivateRedis) -> None:
    """The connection is lost while Redis itself is up (a network blip, a restart the worker
    noticed late): the closing channel puts its message back, then the late ack comes, harmless:
    the message, already back in the queue, is delivered again and replays under its key."""
    conn, message = hold_one(server, {"n": 4})
    conn.release()
    assert where(server) == (1, 0)
    message.ack()
    assert where(server) == (1, 0)


def stale_events_after_disconnect(server: PrivateRedis, transport: type) -> list[Any]:
    """A channel's event-loop connection (as kombu connects the wait for a message and the
    subscriber), watched by the worker's hub, while another descriptor of its socket is open (a
    pool process forked meanwhile holds one; a ``dup`` here), is disconnected. What the hub's
    epoll reports for its number afterwards: a stale entry fires readable on every poll, and
    kombu hands that number's events to whichever connection takes the number next."""
    hub = hubs.Hub()
    hub.reset()  # as after a consumer reconnect: the hub is no longer the current event loop
    conn = connection(server, transport)
    held = -1
    try:
        channel = conn.default_channel
        conn.transport.register_with_event_loop(conn.connection, hub)
        redis_connection = channel.client.connection_pool.get_connection()
        redis_connection.connect()
        fd = redis_connection._sock.fileno()
        hub.add_reader(fd, lambda: None)
        held = os.dup(fd)  # the forked pool process's copy
        redis_connection.disconnect()
        return [(n, event) for n, event in hub.poller.poll(0) or () if n == fd]
    finally:
        if held >= 0:
            os.close(held)
        conn.release()
        hub.close()


def test_kombus_connection_leaves_a_stale_epoll_entry(server: PrivateRedis) -> None:
    """The fault, on kombu's own channel: the socket left the loop only after it was closed."""
    assert stale_events_after_disconnect(server, kombu_redis.Transport) != []


def test_our_connection_leaves_the_loop_before_it_closes(server: PrivateRedis) -> None:
    """Issue 25 (worker-broker link silently dropped): kombu then read the replacement subscriber,
    which had nothing to say, with no timeout, and the worker took nothing more."""
    assert stale_events_after_disconnect(server, Transport) == []


@pytest.mark.parametrize("settle", ["ack", "reject", "requeue"])
def test_a_failed_settling_frees_its_place_in_the_prefetch_window(
    server: PrivateRedis, settle: str
) -> None:
    """Redis does not answer the acknowledgement (a link gone silent: here Redis is down). kombu
    kept the message's place in the prefetch window for the channel's life, so a worker whose
    window had filled with such messages took none again (issue 25). The place is freed; the
    message stays in ``unacked``, where the visibility timeout finds it."""
    conn, message = hold_one(server, {"n": 5})
    try:
        qos = message.channel.qos
        qos.prefetch_count = 1
        assert not qos.can_consume()
        server.kill()
        with pytest.raises(RedisConnectionError):
            if settle == "ack":
                message.ack()
            else:
                message.reject(requeue=settle == "requeue")
        assert qos.can_consume()
        server.start()
        assert where(server) == (0, 1)
    finally:
        with contextlib.suppress(Exception):
            conn.release()
