"""worker/queues.py: each message reaches exactly one queue, checked on Redis lists that no
worker consumes (the run's result database: the session's workers listen on its broker)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange, Queue  # type: ignore[attr-defined]

from worker.config import celery_config
from worker.queues import DEFAULT_QUEUE, RENEWALS_QUEUE, drop_stale_bindings
from worker.settings import Settings


@pytest.fixture
def quiet_broker() -> Iterator[tuple[str, redis.Redis]]:
    """A Redis database nobody consumes from, emptied of queues and bindings before and after."""
    url = Settings().backend
    client = redis.Redis.from_url(url)

    def clear() -> None:
        keys = [DEFAULT_QUEUE, RENEWALS_QUEUE, *client.scan_iter(match="_kombu.binding*")]
        client.delete(*keys)

    clear()
    try:
        yield url, client
    finally:
        clear()
        client.close()


def app_on(url: str) -> Celery:
    app = Celery("producer", set_as_current=False)
    app.config_from_object(celery_config(Settings(broker_url=url)))
    return app


def declare(conn: Connection, *queues: Queue) -> None:
    """Declare queues and their bindings, as a worker consuming them does when it starts."""
    for queue in queues:
        queue.bind(conn.default_channel).declare()  # type: ignore[no-untyped-call]


def lengths(client: redis.Redis) -> dict[str, int]:
    return {q: int(client.llen(q)) for q in (DEFAULT_QUEUE, RENEWALS_QUEUE)}


def publish_to_default(conn: Connection) -> None:
    producer = conn.Producer()  # type: ignore[no-untyped-call]
    producer.publish({"n": 1}, exchange=DEFAULT_QUEUE, routing_key=DEFAULT_QUEUE)


def test_a_message_reaches_exactly_one_queue(quiet_broker: tuple[str, redis.Redis]) -> None:
    url, client = quiet_broker
    app = app_on(url)
    with app.connection_for_write() as conn:
        declare(conn, *app.amqp.queues.values())
        publish_to_default(conn)  # what a producer naming no queue sends
        assert lengths(client) == {DEFAULT_QUEUE: 1, RENEWALS_QUEUE: 0}

    app.send_task("renewals.sweep", kwargs={})
    assert lengths(client) == {DEFAULT_QUEUE: 1, RENEWALS_QUEUE: 1}
    app.send_task("tokens.get_balance", kwargs={"user_id": "u"})
    assert lengths(client) == {DEFAULT_QUEUE: 2, RENEWALS_QUEUE: 1}

    # A producer with none of this project's settings that names the queue reaches it too.
    bare = Celery("bare", broker=url, set_as_current=False)
    bare.send_task("renewals.sweep", kwargs={}, queue=RENEWALS_QUEUE)
    assert lengths(client) == {DEFAULT_QUEUE: 2, RENEWALS_QUEUE: 2}


def test_the_binding_earlier_releases_left_in_redis_is_dropped(
    quiet_broker: tuple[str, redis.Redis],
) -> None:
    url, client = quiet_broker
    app = app_on(url)
    with app.connection_for_write() as conn:
        # What `Queue("renewals")` declared: Celery's default exchange and routing key.
        old_exchange = Exchange(DEFAULT_QUEUE)  # type: ignore[no-untyped-call]
        legacy = Queue(RENEWALS_QUEUE, old_exchange, routing_key=DEFAULT_QUEUE)  # type: ignore[no-untyped-call]
        declare(conn, legacy, *app.amqp.queues.values())
        publish_to_default(conn)
        assert lengths(client) == {DEFAULT_QUEUE: 1, RENEWALS_QUEUE: 1}  # the defect

    assert drop_stale_bindings(url) == 2  # the binding table and kombu's permanent set
    with app.connection_for_write() as conn:
        publish_to_default(conn)
    assert lengths(client) == {DEFAULT_QUEUE: 2, RENEWALS_QUEUE: 1}
    assert drop_stale_bindings(url) == 0
