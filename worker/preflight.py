"""Checks before work starts, for the worker (at start, before it says ready), the CLI and
``tokens doctor``: is the database reachable and migrated to head, are the broker and the result
backend reachable. Each check answers None or one line naming the problem, URLs masked.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from kombu import Connection  # type: ignore[attr-defined]
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from worker.migrate import alembic_config
from worker.settings import get_settings, masked

TIMEOUT = 5.0


class Unavailable(Exception):
    """A server the command needs is unreachable, or the database is not migrated."""


def reason(exc: BaseException) -> str:
    """The error in one line: the driver's own message (never a URL with a password: drivers
    name host and port only), without SQLAlchemy's background link."""
    inner = getattr(exc, "orig", None) or exc
    text = " ".join(line.strip() for line in str(inner).splitlines() if line.strip())
    text = text.split(" (Background on this error at:")[0].rstrip(".")
    return text or type(inner).__name__


def _engine(url: str, timeout: float) -> Any:
    args = {"connect_timeout": max(1, int(timeout))} if url.startswith("postgresql") else {}
    return create_engine(url, poolclass=NullPool, connect_args=args)


def head_revisions() -> set[str]:
    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def database_revisions(url: str, timeout: float = TIMEOUT) -> set[str]:
    """The revisions the database is at; raises SQLAlchemyError when it is unreachable."""
    engine = _engine(url, timeout)
    try:
        with engine.connect() as conn:
            return set(MigrationContext.configure(conn).get_current_heads())
    finally:
        engine.dispose()


def database_problem(url: str | None = None, timeout: float = TIMEOUT) -> str | None:
    """Unreachable, or not at the migrations' head: what is wrong, in one line."""
    url = url or get_settings().db_url
    try:
        current = database_revisions(url, timeout)
    except SQLAlchemyError as exc:
        return not_running(url) or f"database {masked(url)} unreachable: {reason(exc)}"
    return schema_problem(url, current)


def not_running(url: str) -> str | None:
    """For a server of the embedded default (no ``TOKENS_*`` server set): that it is not
    running, and what starts it."""
    settings = get_settings()
    if not settings.embedded or url not in (settings.db_url, settings.broker, settings.backend):
        return None
    parsed = make_url(url.removeprefix("db+").removeprefix("sqla+"))
    server = "Valkey" if parsed.drivername == "redis" else "PostgreSQL"
    return (
        f"the embedded {server} (127.0.0.1:{parsed.port}) is not running: start it with "
        "`make run` (or `python -m worker.embedded start`)"
    )


def schema_problem(url: str, current: set[str]) -> str | None:
    head = head_revisions()
    if current == head:
        return None
    fix = "run `tokens migrate`"
    if not current:
        return f"database {masked(url)} is not migrated: {fix}"
    known = {r.revision for r in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if not current <= known:
        return (
            f"database {masked(url)} is at revision {', '.join(sorted(current))}, unknown to "
            f"this release (head {', '.join(sorted(head))}): was it migrated by a newer one?"
        )
    return (
        f"database {masked(url)} is at revision {', '.join(sorted(current))}, not "
        f"{', '.join(sorted(head))}: {fix}"
    )


def wait_for_database(seconds: float, url: str | None = None) -> None:
    """Return once the database accepts connections; raise :class:`Unavailable` after
    ``seconds`` (a bounded retry, for a database that is still starting)."""
    url = url or get_settings().db_url
    deadline = time.monotonic() + seconds
    pause = 0.25
    while True:
        remaining = deadline - time.monotonic()
        try:
            database_revisions(url, timeout=max(1.0, min(TIMEOUT, remaining)))
            return
        except SQLAlchemyError as exc:
            if time.monotonic() + pause > deadline:
                raise Unavailable(
                    f"database {masked(url)} unreachable after {seconds:g} s: {reason(exc)}"
                ) from None
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


def broker_problem(url: str | None = None, timeout: float = TIMEOUT) -> str | None:
    url = url or get_settings().broker
    try:
        with Connection(url, connect_timeout=timeout) as conn:  # type: ignore[no-untyped-call]
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
    except Exception as exc:  # kombu raises each transport's own errors
        return not_running(url) or f"broker {masked(url)} unreachable: {reason(exc)}"
    return None


def backend_problem(url: str | None = None, timeout: float = TIMEOUT) -> str | None:
    url = url or get_settings().backend
    try:
        if url.startswith(("redis://", "rediss://")):
            client = redis.Redis.from_url(
                url, socket_connect_timeout=timeout, socket_timeout=timeout
            )
            try:
                client.ping()
            finally:
                client.close()
        else:  # db+<SQLAlchemy URL>
            engine = _engine(url.removeprefix("db+"), timeout)
            try:
                with engine.connect():
                    pass
            finally:
                engine.dispose()
    except (redis.RedisError, SQLAlchemyError, OSError) as exc:
        return not_running(url) or f"result backend {masked(url)} unreachable: {reason(exc)}"
    return None


def start_problems() -> list[str]:
    """What keeps a worker from doing its work: checked before it says ready."""
    checks = (database_problem(), broker_problem(), backend_problem())
    return [problem for problem in checks if problem]
