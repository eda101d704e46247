"""The task queues and how a message reaches them.

``celery`` is the default queue (a producer that names no queue lands there) and ``renewals``
holds the sweep and its chunks, served by workers of their own in production. Each queue is
bound to a direct exchange of its own name with its own name as routing key, the binding Celery
itself declares for a queue a producer names without this project's configuration, so both
kinds of producer reach the same single queue.

Earlier releases bound ``renewals`` to exchange ``celery`` with key ``celery`` (Celery's defaults
for a queue declared by name only), so every message for the default queue was copied to
``renewals`` as well: one sweep ran on two workers. kombu's Redis transport keeps bindings in
Redis, where they outlive the code that declared them; a worker removes that one when it starts.
"""

from __future__ import annotations

import redis
from kombu import Exchange, Queue  # type: ignore[attr-defined]
from kombu.transport.redis import Channel as RedisChannel

DEFAULT_QUEUE = "celery"
RENEWALS_QUEUE = "renewals"

#: (exchange, routing key, queue) of bindings no release declares any more.
STALE_BINDINGS = ((DEFAULT_QUEUE, DEFAULT_QUEUE, RENEWALS_QUEUE),)


def queue_arguments(queue_type: str = "classic") -> dict[str, str] | None:
    """RabbitMQ's arguments for a queue of ``queue_type``. A queue's type is fixed when it is
    first declared, and RabbitMQ refuses (406 PRECONDITION_FAILED) a declaration with other
    arguments: every producer and worker must declare the queues alike (a Celery producer:
    ``task_default_queue_type = "quorum"``). Redis ignores them."""
    return {"x-queue-type": "quorum"} if queue_type == "quorum" else None


def task_queues(queue_type: str = "classic") -> tuple[Queue, ...]:
    return tuple(
        Queue(  # type: ignore[no-untyped-call]
            name,
            Exchange(name, type="direct"),  # type: ignore[no-untyped-call]
            routing_key=name,
            queue_arguments=queue_arguments(queue_type),
        )
        for name in (DEFAULT_QUEUE, RENEWALS_QUEUE)
    )


def drop_stale_bindings(broker_url: str) -> int:
    """Remove :data:`STALE_BINDINGS` from kombu's binding tables in Redis; returns how many
    table entries went."""
    client = redis.Redis.from_url(broker_url)
    removed = 0
    try:
        for exchange, routing_key, queue in STALE_BINDINGS:
            # A direct exchange stores no pattern: "<routing key><sep><sep><queue>".
            member = RedisChannel.sep.join([routing_key, "", queue])
            for table in (RedisChannel.keyprefix_queue, RedisChannel.keyprefix_binding_permanent):
                removed += int(client.srem(table % exchange, member))
    finally:
        client.close()
    return removed
