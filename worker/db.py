"""The database engine (one per process, created after fork) and session scopes."""

from __future__ import annotations

import logging
import os
import time
from collections import namedtuple
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import PoolProxiedConnection

from accounting import events, statements
from worker.settings import get_settings

log = logging.getLogger(__name__)

# libpq's PQTRANS_ACTIVE (psycopg 3 and psycopg2 alike): a command is in progress.
_COMMAND_IN_PROGRESS = 1

#: Server settings in milliseconds, e.g. ``(("lock_timeout", 1000),)``, for every session of an
#: engine: sent when a connection starts, so they cost no round trip per transaction.
Timeouts = tuple[tuple[str, int], ...]

_engines: dict[tuple[int, str, Timeouts], Engine] = {}


def make_engine(url: str, timeouts: Timeouts = ()) -> Engine:
    """An engine for ``url`` (PostgreSQL through psycopg 3)."""
    connect_args: dict[str, Any] = {"connect_timeout": 10}
    if timeouts:
        connect_args["options"] = " ".join(f"-c {name}={ms}" for name, ms in timeouts)
    engine = create_engine(
        url,
        pool_pre_ping=get_settings().db_pool_pre_ping,
        pool_size=get_settings().db_pool_size,
        max_overflow=2,
        connect_args=connect_args,
    )
    event.listen(engine, "handle_error", _discard_interrupted_connection)
    if not get_settings().db_pool_pre_ping:
        _ping_when_idle(engine)
    return engine


# A pooled connection idle at least this long is pinged before use; one in steady use is not.
PING_AFTER_IDLE = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """``pool_pre_ping``, but only for a connection that sat idle in the pool for
    :data:`PING_AFTER_IDLE` seconds: the ping was a round trip on every task, as dear as the
    debit's own statement. A connection that died while idle (the server restarted, a firewall
    dropped it) is still replaced before use; one that breaks between two busy tasks fails its
    statement, the pool is invalidated, and the task retries as a transient error
    (worker/failures.py ``is_transient``)."""

    @event.listens_for(engine, "checkin")
    def _idle_from(dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _ping(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.pop("idle_since", None)
        if since is None or time.monotonic() - since < PING_AFTER_IDLE:
            return  # just connected, or just used
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool discards this connection and checks out (or opens) another.
            raise DisconnectionError(f"ping failed: {exc!r}") from exc


def _discard_interrupted_connection(context: ExceptionContext) -> None:
    """A statement interrupted from outside the database (a time limit's signal raising inside
    psycopg's wait) leaves the connection in the middle of a command: no rollback can run on it
    ("another command is already in progress"), and the server goes on waiting or working, with
    the transaction's locks held. Cancel the statement in the server and discard this connection
    (only this one: the pool is fine). Never raises: what it raised would replace the original
    exception."""
    if isinstance(context.original_exception, context.dialect.loaded_dbapi.Error):
        return  # the database's own errors leave the connection as the dialect knows to handle
    try:
        connection = context.connection
        if connection is None or connection.invalidated:
            return
        if _cancel_command(connection.connection.dbapi_connection):
            context.is_disconnect = True
            context.invalidate_pool_on_disconnect = False
    except Exception as exc:  # the connection is discarded all the same
        log.warning("could not cancel an interrupted statement: %r", exc)


def _cancel_command(dbapi_connection: Any) -> bool:
    """Cancel the command ``dbapi_connection`` is in the middle of, if any; whether it was."""
    info = getattr(dbapi_connection, "info", None)
    if getattr(info, "transaction_status", None) != _COMMAND_IN_PROGRESS:
        return False
    cancel_safe = getattr(dbapi_connection, "cancel_safe", None)
    if cancel_safe is not None:  # psycopg 3.2+: bounded, never blocks long
        cancel_safe(timeout=5.0)
    elif dbapi_connection is not None:
        dbapi_connection.cancel()
    return True


def get_engine(timeouts: Timeouts = ()) -> Engine:
    """This process's engine (one per set of ``timeouts``). Keyed by pid, so a forked child never
    reuses its parent's sockets."""
    url = get_settings().db_url
    key = (os.getpid(), url, timeouts)
    engine = _engines.get(key)
    if engine is None:
        engine = _engines[key] = make_engine(url, timeouts)
    return engine


def reset_engines_after_fork() -> None:
    """Drop inherited engines without closing the parent's connections (SQLAlchemy pooling docs)."""
    for key, engine in list(_engines.items()):
        if key[0] != os.getpid():
            engine.dispose(close=False)
            del _engines[key]


def dispose_engines() -> None:
    for key, engine in list(_engines.items()):
        engine.dispose()
        del _engines[key]


_makers: dict[int, tuple[Engine, sessionmaker[Session]]] = {}


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    """This process's session maker for ``engine`` (default :func:`get_engine`), made once per
    engine rather than once per unit of work."""
    engine = engine or get_engine()
    made = _makers.get(id(engine))
    if made is None or made[0] is not engine:
        maker = sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
        made = _makers[id(engine)] = (engine, maker)
    return made[1]


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception. The exception that
    ended the unit of work is the one raised, even when the rollback fails too."""
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        _roll_back_or_discard(session)
        raise
    finally:
        session.close()


@contextmanager
def statement_scope() -> Iterator[Session]:
    """A unit of work that is one movement statement (accounting/statements.py). On PostgreSQL
    the statement runs alone: on a pooled connection in autocommit, used through the driver, it
    is its own transaction and one round trip, without BEGIN and COMMIT nor the Session's and
    the Core's per-statement work. The session carries the events, sent at the end as after a
    commit (and dropped after an exception, as a rollback drops them)."""
    engine = get_engine()
    pooled = _checkout(engine)
    driver = pooled.driver_connection
    assert driver is not None
    session = statements.AloneSession(
        partial(_run_alone, engine, pooled), bind=engine, expire_on_commit=False, autoflush=False
    )
    try:
        driver.autocommit = True
        yield session
        if session.in_transaction():  # nothing uses the session itself today, but if it did
            session.commit()
        else:
            events.send_noted(session)
    except BaseException:
        _roll_back_or_discard(session)
        raise
    finally:
        session.close()
        if pooled.is_valid:
            driver.autocommit = False
        pooled.close()  # back to the pool


def _checkout(engine: Engine) -> PoolProxiedConnection:
    """A pooled connection as ``engine.connect()`` would check it out (the idle ping applies),
    a failure to connect raised as the Core raises it (tasks retry its OperationalError)."""
    dbapi = engine.dialect.loaded_dbapi
    try:
        return engine.raw_connection()
    except dbapi.Error as exc:
        raise DBAPIError.instance(None, None, exc, dbapi.Error, dialect=engine.dialect) from exc


def _run_alone(
    engine: Engine, pooled: PoolProxiedConnection, sql: str, params: dict[str, Any]
) -> Any:
    """A :data:`accounting.statements.Runner`: ``sql`` on ``pooled`` in autocommit, its row as a
    named tuple. Errors as the Core gives them (tasks retry its OperationalError); a lost
    connection is discarded, and so is one a time limit interrupted, after cancelling its
    command in the server (as :func:`_discard_interrupted_connection` does for the Core)."""
    driver = pooled.driver_connection
    assert driver is not None
    dbapi = engine.dialect.loaded_dbapi
    try:
        with driver.cursor() as cursor:
            cursor.execute(sql, params)
            row = cursor.fetchone()
            return None if row is None else _row_type(sql, cursor)._make(row)
    except dbapi.Error as exc:
        lost = engine.dialect.is_disconnect(exc, pooled, None)
        if lost:
            pooled.invalidate(exc)
        raise DBAPIError.instance(
            sql, params, exc, dbapi.Error, connection_invalidated=lost, dialect=engine.dialect
        ) from exc
    except BaseException:
        try:
            _cancel_command(driver)
        except Exception as cancel_failed:
            log.warning("could not cancel an interrupted statement: %r", cancel_failed)
        pooled.invalidate()
        raise


_row_types: dict[tuple[str, tuple[bytes | None, ...]], Any] = {}


def _row_type(sql: str, cursor: Any) -> Any:
    """A named tuple type for ``sql``'s rows, made once per statement and column names: psycopg's
    ``namedtuple_row`` makes its column objects on each execute (about 12 µs a movement), and so
    does ``cursor.description`` (7 µs); the names as libpq holds them cost 0.5 µs."""
    result = cursor.pgresult
    key = (sql, tuple(map(result.fname, range(result.nfields))))
    made = _row_types.get(key)
    if made is None:
        names = [c.name for c in cursor.description]
        made = _row_types[key] = namedtuple("Row", names, rename=True)
    return made


def _roll_back_or_discard(session: Session) -> None:
    try:
        session.rollback()
    except Exception as exc:
        # The connection cannot even roll back (say, still in the middle of a command): close it
        # rather than hand it back to the pool, and let the original exception stand.
        log.warning("rollback failed, connection discarded: %s", repr(exc).splitlines()[0])
        session.invalidate()
