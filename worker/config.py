"""Celery configuration, built from the one settings object."""

from __future__ import annotations

from typing import Any

from beat_schedule import beat_schedule
from worker import sqlpolling
from worker.queues import DEFAULT_QUEUE, RENEWALS_QUEUE, task_queues
from worker.settings import Settings
from worker.sqlpolling import BROKER_POLLING_INTERVAL

#: Seconds a worker waits for Redis to answer a command (not the blocking wait for a message).
REDIS_SOCKET_TIMEOUT = 10


def celery_config(settings: Settings) -> dict[str, Any]:
    # Redis redelivers what a dead worker held after visibility_timeout. These options are for
    # Redis only: the SQLAlchemy transport would hand them to create_engine (worker/sqlpolling.py).
    transport: dict[str, Any] = {}
    if settings.broker_is_redis:
        transport = {
            "visibility_timeout": settings.visibility_timeout,
            # kombu looks for what a dead worker held only every interval x throttle seconds
            # (10 x 10 by default), so redelivery came up to 100 s after the visibility timeout.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 10)),
            "unacked_restore_throttle": 1,
            # Only the holder of this lock puts back what dead workers held; one whose connection
            # went silent while taking it held it for kombu's 300 s, and nothing came back
            # meanwhile. Each message is put back in a WATCHed transaction, so two at once are
            # harmless: the lock need only outlast one pass.
            "unacked_mutex_expire": max(5, min(30, settings.visibility_timeout // 10)),
            "health_check_interval": 25,
            "socket_keepalive": True,
            # Acknowledgements and the like are read with a blocking call in the consumer's
            # loop: on a link that went silent (packets dropped, no reset) a read without a
            # timeout waited for TCP keepalive (hours) and the worker took nothing meanwhile.
            # Timed out, it is a connection error: Celery reconnects (tests/faults/).
            "socket_timeout": REDIS_SOCKET_TIMEOUT,
            "socket_connect_timeout": REDIS_SOCKET_TIMEOUT,
        }
    # RabbitMQ has no visibility timeout: it redelivers what a worker held as soon as the
    # worker's connection closes (a crash included), and closes a channel holding a message
    # unacknowledged past its own consumer_timeout (30 min by default, server-side), far above
    # TOKENS_TASK_TIME_LIMIT. Nothing to set here; TOKENS_VISIBILITY_TIMEOUT only bounds the
    # time limits.
    backend_transport: dict[str, Any] = {}
    if settings.backend.startswith(("redis://", "rediss://")):
        backend_transport = {"visibility_timeout": settings.visibility_timeout}
    config: dict[str, Any] = {
        "broker_url": settings.broker,
        "result_backend": settings.backend,
        **_polling_sql(settings, transport),
        "broker_transport_options": transport,
        "result_backend_transport_options": backend_transport,
        "broker_connection_retry_on_startup": True,
        # JSON only: a pickled message is code execution for whoever can write to the broker.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # At-least-once: a task whose worker dies is delivered again; tasks are idempotent.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_soft_time_limit": settings.task_soft_time_limit,
        "task_time_limit": settings.task_time_limit,
        "result_expires": settings.result_expires,
        # Task events feed Flower (which can also switch them on at run time); they cost about a
        # fifth of a debit round trip (bench.debits), hence the switch.
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": settings.task_events,
        "timezone": "UTC",
        "enable_utc": True,
        "task_default_queue": DEFAULT_QUEUE,
        "task_queues": task_queues(settings.queue_type),
        # Queues Celery declares itself (a queue named by a task and not listed) get the same
        # type. Quorum queues have no global QoS: Celery detects them (the default) and sets
        # the prefetch per consumer instead, a static count.
        "task_default_queue_type": settings.queue_type,
        "task_create_missing_queue_type": settings.queue_type,
        "worker_detect_quorum_queues": True,
        "task_routes": {"renewals.*": {"queue": RENEWALS_QUEUE}},
        "worker_hijack_root_logger": False,
        # Every task message is checked where it is decoded, before the pool sees it: a poison
        # message is refused, not allowed to stop the worker (worker/consumer.py, poison.py).
        "worker_consumer": "worker.consumer:GuardedConsumer",
        "beat_schedule": beat_schedule(settings),
    }
    if settings.worker_concurrency is not None:
        config["worker_concurrency"] = settings.worker_concurrency
    # RedBeat keeps the schedule and the one-beat lock in Redis: the Redis broker's, or with
    # RabbitMQ the Redis of TOKENS_REDBEAT_REDIS_URL (without it: one beat, schedule in a file).
    if settings.redbeat_url is not None:
        config |= {
            "beat_scheduler": "redbeat.RedBeatScheduler",
            "redbeat_redis_url": settings.redbeat_url,
            # Explicit: RedBeat 2.4.2 deprecates falling back to broker_transport_options (and
            # does not pass those to its client). retry_period: ride out a Redis blip for less
            # than the lock timeout instead of crashing the beat.
            "redbeat_redis_options": {
                "health_check_interval": 25,
                "socket_keepalive": True,
                "retry_period": 60,
            },
            # RedBeat appends entry names to the prefix as is (its own default is "redbeat:"),
            # so end it with ":" to get tokens:redbeat:<entry>, ...::schedule and ...::lock.
            "redbeat_key_prefix": "tokens:redbeat:",
            # A standby beat retries the lock every loop interval and takes over once the
            # holder has not extended it for redbeat_lock_timeout (5 loop intervals).
            "beat_max_loop_interval": 30,
            "redbeat_lock_timeout": 150,
        }
    else:
        config["beat_schedule_filename"] = str(settings.var_dir / "celerybeat-schedule")
    return config


def _polling_sql(settings: Settings, transport: dict[str, Any]) -> dict[str, Any]:
    """A SQLAlchemy broker or database backend through the classes in worker/sqlpolling.py.

    A ``sqla+`` prefix (or a driver: ``+psycopg``) would make kombu pick a transport by that
    name whatever ``broker_transport`` says, so the URL goes without them; producers that keep
    them share the same tables.
    """
    config: dict[str, Any] = {}
    if settings.broker.startswith("sqla+"):
        transport["polling_interval"] = BROKER_POLLING_INTERVAL
        config |= {
            "broker_url": sqlpolling.broker_url(settings.broker),
            "broker_transport": "worker.sqlpolling:Transport",
        }
    if settings.backend.startswith("db+"):
        config |= {
            "result_backend": "worker.sqlpolling:DatabaseBackend",
            "database_url": settings.backend.removeprefix("db+"),
        }
    return config
