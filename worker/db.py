"""The database engine (one per process, created after fork) and session scopes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from worker.settings import get_settings

_engines: dict[tuple[int, str], Engine] = {}


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets a busy timeout and writer-serialising transactions."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})
        _serialise_sqlite_writers(engine)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=get_settings().db_pool_size,
        max_overflow=2,
        connect_args={"connect_timeout": 10},
    )


def _serialise_sqlite_writers(engine: Engine) -> None:
    # pysqlite starts transactions lazily and as DEFERRED, so two writers that both read first
    # deadlock on the upgrade; BEGIN IMMEDIATE takes the write lock up front (the SQLAlchemy
    # pysqlite docs, "Serializable isolation / Savepoints / Transactional DDL").
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None
        dbapi_conn.execute("PRAGMA journal_mode=WAL")
        dbapi_conn.execute("PRAGMA foreign_keys=ON")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def get_engine() -> Engine:
    """This process's engine. Keyed by pid, so a forked child never reuses its parent's sockets."""
    url = get_settings().db_url
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is None:
        engine = _engines[key] = make_engine(url)
    return engine


def reset_engines_after_fork() -> None:
    """Drop inherited engines without closing the parent's connections (SQLAlchemy pooling docs)."""
    for (pid, _url), engine in list(_engines.items()):
        if pid != os.getpid():
            engine.dispose(close=False)
            del _engines[(pid, _url)]


def dispose_engines() -> None:
    for key, engine in list(_engines.items()):
        engine.dispose()
        del _engines[key]


def session_factory() -> sessionmaker[Session]:
    return sessionmaker(bind=get_engine(), expire_on_commit=False, autoflush=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    session = session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
