"""``tokens doctor``: is everything the service needs there, and what is wrong if not.

Each check is one line: the database (reachable), its schema (at the migrations' head), the
broker, the result backend, the beat lock (RedBeat: some beat process holds it, so scheduled
work runs) and the workers: at least one must answer within the timeout (a broadcast, and then
every queue must have one; ``health.ping`` where the broker cannot broadcast). No worker
answering is a problem: nothing would run what producers send.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import redis
from sqlalchemy.exc import SQLAlchemyError

from worker.preflight import (
    backend_problem,
    broker_problem,
    database_revisions,
    head_revisions,
    not_running,
    reason,
    schema_problem,
)
from worker.queues import DEFAULT_QUEUE, RENEWALS_QUEUE
from worker.settings import get_settings, masked

if TYPE_CHECKING:
    from celery import Celery


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # "ok", "FAIL" or "skip"
    detail: str


def _database(timeout: float) -> list[Check]:
    url = get_settings().db_url
    try:
        current = database_revisions(url, timeout)
    except SQLAlchemyError as exc:
        down = not_running(url) or f"{masked(url)} unreachable: {reason(exc)}"
        return [
            Check("database", "FAIL", down),
            Check("schema", "skip", "the database is unreachable"),
        ]
    reachable = Check("database", "ok", f"{masked(url)} reachable")
    problem = schema_problem(url, current)
    if problem:
        return [reachable, Check("schema", "FAIL", problem)]
    return [reachable, Check("schema", "ok", f"at head {', '.join(sorted(head_revisions()))}")]


def _server(name: str, problem: str | None, url: str) -> Check:
    return (
        Check(name, "FAIL", problem) if problem else Check(name, "ok", f"{masked(url)} reachable")
    )


def _beat(timeout: float) -> Check:
    settings = get_settings()
    if settings.redbeat_url is None:
        where = (
            "the embedded default"
            if not settings.broker_is_amqp
            else "RabbitMQ without TOKENS_REDBEAT_REDIS_URL"
        )
        return Check("beat", "skip", f"no RedBeat lock on {where}")
    from redbeat.schedulers import RedBeatConfig

    from worker.celery import app

    key = RedBeatConfig(app).lock_key
    url = app.conf.redbeat_redis_url
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        ttl_ms = int(client.pttl(key))
    except redis.RedisError as exc:
        return Check("beat", "FAIL", f"cannot read {key} on {masked(url)}: {reason(exc)}")
    finally:
        client.close()
    if ttl_ms == -2:
        return Check(
            "beat",
            "FAIL",
            f"no beat holds {key}: renewals, expiries, reconcile and pruning are not scheduled; "
            "start `celery -A worker beat`",
        )
    if ttl_ms == -1:
        return Check("beat", "ok", f"{key} held, with no expiry")
    return Check("beat", "ok", f"{key} held; expires in {ttl_ms / 1000:.0f} s unless renewed")


def broadcasts(app: Celery) -> bool:
    """Whether the broker carries Celery's remote control (fanout; kombu's virtual transports,
    such as the SQLAlchemy one, say per channel)."""
    with app.connection_for_read() as conn:
        return bool(
            conn.supports_exchange_type("fanout")
            and getattr(conn.default_channel, "supports_fanout", True)
        )


def _workers(timeout: float, broker_reachable: bool) -> Check:
    if not broker_reachable:
        return Check("workers", "skip", "the broker is unreachable")
    from worker.celery import app

    try:
        if not broadcasts(app):
            return _ping_task(app, timeout)
        replies = app.control.inspect(timeout=timeout).active_queues() or {}
    except Exception as exc:  # kombu raises each transport's own errors
        return Check("workers", "FAIL", f"cannot ask the workers: {reason(exc)}")
    if not replies:
        return Check("workers", "FAIL", f"no worker answered within {timeout:g} s")
    served = {q["name"] for queues in replies.values() for q in queues or []}
    who = ", ".join(
        f"{name} ({', '.join(sorted(q['name'] for q in queues or []))})"
        for name, queues in sorted(replies.items())
    )
    missing = [q for q in (DEFAULT_QUEUE, RENEWALS_QUEUE) if q not in served]
    if missing:
        return Check("workers", "FAIL", f"no worker consumes {', '.join(missing)}; answered: {who}")
    return Check("workers", "ok", f"{len(replies)} answered: {who}")


def _ping_task(app: Celery, timeout: float) -> Check:
    """Where the broker cannot broadcast (kombu's SQLAlchemy transport), a worker is asked the
    way a producer asks: ``health.ping`` through the default queue. The message expires with the
    wait, so a worker started later does not run it."""
    from celery.exceptions import TimeoutError as NoResult

    result = app.send_task("health.ping", expires=timeout)
    try:
        answer = result.get(timeout=timeout, propagate=False)
    except NoResult:
        return Check("workers", "FAIL", f"no worker answered health.ping within {timeout:g} s")
    finally:
        result.forget()
    if isinstance(answer, dict) and answer.get("success") is True:
        return Check("workers", "ok", "a worker answered health.ping (queues not listed)")
    return Check("workers", "FAIL", f"health.ping answered {answer!r}")


def run_checks(timeout: float) -> list[Check]:
    settings = get_settings()
    broker = broker_problem(timeout=timeout)
    return [
        *_database(timeout),
        _server("broker", broker, settings.broker),
        _server("backend", backend_problem(timeout=timeout), settings.backend),
        _beat(timeout),
        _workers(timeout, broker is None),
    ]
