"""worker/db.py: a statement interrupted by a time limit (a signal raising in the middle of
psycopg's wait) leaves its connection mid-command. The unit of work must end with that
interruption, not with the rollback that can no longer run, and the connection must be thrown
away, never handed out again."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import create_engine, text
from sqlalchemy.orm import sessionmaker
from sqlalchemy.pool import QueuePool

from accounting import statements
from accounting.accounts import open_account
from tests import dbstate
from tests.polling import wait_for
from tests.worker.test_faults import backend_alive, lock_waiters, row_locked
from worker import db
from worker.db import get_engine, session_scope
from worker.settings import get_settings

UPDATE = text("UPDATE accounts SET tokens_balance = tokens_balance - 1 WHERE user_id = 'u'")


@pytest.fixture
def account(clean_db: None) -> str:
    with session_scope() as session:
        open_account(session, "u", initial_balance=100)
    return "u"


@contextmanager
def soft_time_limit_in(seconds: float) -> Iterator[None]:
    """Raise SoftTimeLimitExceeded from a signal handler, as billiard does in a pool process."""

    def fire(_signum: int, _frame: Any) -> None:
        raise SoftTimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_time_limit_mid_statement_ends_the_scope_and_discards_the_connection(
    account: str,
) -> None:
    pids: list[int] = []
    with row_locked("u"):
        with pytest.raises(SoftTimeLimitExceeded), soft_time_limit_in(0.5), session_scope() as s:
            pids.append(s.execute(text("SELECT pg_backend_pid()")).scalar_one())
            s.execute(UPDATE)  # waits on our lock until the limit fires
        # Cancelled in the server and closed: it no longer waits on the lock we still hold.
        assert not lock_waiters()
        wait_for(lambda: not backend_alive(pids[0]), 5, "the interrupted backend to end")
        # The pool hands out a working connection, never the interrupted one.
        with session_scope() as session:
            assert session.execute(text("SELECT pg_backend_pid()")).scalar_one() != pids[0]
    assert dbstate.balance("u") == 100


def test_failed_rollback_does_not_replace_the_original_exception(
    account: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An engine with none of the project's listeners: the interrupted connection is still
    # mid-command when session_scope rolls back, so the rollback itself fails.
    engine = create_engine(get_settings().db_url, pool_size=1, max_overflow=0)
    monkeypatch.setattr(db, "session_factory", lambda _engine=None: sessionmaker(bind=engine))
    try:
        pids: list[int] = []
        with row_locked("u"):
            with (
                pytest.raises(SoftTimeLimitExceeded),
                soft_time_limit_in(0.5),
                session_scope() as session,
            ):
                pids.append(session.execute(text("SELECT pg_backend_pid()")).scalar_one())
                session.execute(UPDATE)
            with engine.connect() as conn:  # the pool's one connection is a fresh one
                assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pids[0]
    finally:
        engine.dispose()
    wait_for(lambda: not backend_alive(pids[0]), 10, "the abandoned backend to end")
    assert dbstate.balance("u") == 100


def test_an_ordinary_error_still_rolls_back_and_keeps_the_connection(account: str) -> None:
    with pytest.raises(ZeroDivisionError), session_scope() as session:
        session.execute(UPDATE)
        pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        1 / 0  # noqa: B018
    assert dbstate.balance("u") == 100
    assert backend_alive(pid)
    pool = get_engine().pool
    assert isinstance(pool, QueuePool) and pool.checkedout() == 0


def test_without_pre_ping_a_dropped_connection_is_a_transient_error_then_replaced(
    account: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TOKENS_DB_POOL_PRE_PING=false: no SELECT 1 before each checkout of a connection in steady
    # use. One the server dropped between two busy tasks fails the unit of work's first
    # statement, before anything is written, with an error the task retries (worker/failures.py
    # is_transient); the pool is refreshed, so the retry runs on a new connection.
    from worker.failures import is_transient

    monkeypatch.setattr(db, "PING_AFTER_IDLE", 3600.0)  # in steady use: never idle long
    settings = get_settings().model_copy(update={"db_pool_pre_ping": False})
    monkeypatch.setattr(db, "get_settings", lambda: settings)
    engine = db.make_engine(settings.db_url)
    assert engine.pool._pre_ping is False
    monkeypatch.setattr(db, "session_factory", lambda _engine=None: sessionmaker(bind=engine))
    try:
        with session_scope() as session:
            pid = session.execute(text("SELECT pg_backend_pid()")).scalar_one()
        with get_engine().connect() as other:  # another pool's connection
            other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        wait_for(lambda: not backend_alive(pid), 5, "the dropped backend to end")
        with pytest.raises(Exception) as dropped, session_scope() as session:
            session.execute(UPDATE)
        assert is_transient(dropped.value)
        with session_scope() as session:
            assert session.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
            session.execute(UPDATE)
    finally:
        engine.dispose()
    assert dbstate.balance("u") == 99


def _backend_pid(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _one_connection_engine() -> Any:
    monkey = pytest.MonkeyPatch()
    monkey.setattr(get_settings(), "db_pool_size", 1)
    try:
        return db.make_engine(get_settings().db_url)
    finally:
        monkey.undo()


def test_a_connection_in_steady_use_is_not_pinged(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _one_connection_engine()
    pings: list[Any] = []

    def ping(conn: Any) -> bool:
        pings.append(conn)
        return True

    monkeypatch.setattr(engine.dialect, "do_ping", ping)
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 3600.0)
    first = _backend_pid(engine)
    assert _backend_pid(engine) == first
    assert pings == []  # checked in and out again at once: no round trip spent on a ping
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.0)  # as if it had sat idle in the pool
    assert _backend_pid(engine) == first
    assert len(pings) == 1
    engine.dispose()


def test_a_connection_that_died_while_idle_is_replaced_before_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = _one_connection_engine()
    pid = _backend_pid(engine)
    with get_engine().connect() as other:
        other.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    wait_for(lambda: not backend_alive(pid), 10, "the backend to end")
    monkeypatch.setattr(db, "PING_AFTER_IDLE", 0.0)  # as if it had sat idle in the pool
    assert _backend_pid(engine) != pid
    engine.dispose()


def test_a_statement_run_alone_gives_its_row_by_column_name_whatever_its_width(
    clean_db: None,
) -> None:
    """The alone runner names a row's columns from the statement's result, once per statement
    and set of names: the same text returning more columns, or the same number under other
    names (a function redefined), is read afresh."""
    engine = get_engine()

    def define(outs: str, body: str) -> None:
        with engine.begin() as conn:
            conn.execute(text("DROP FUNCTION IF EXISTS tokens_test_row()"))
            conn.execute(text(f"CREATE FUNCTION tokens_test_row({outs}) AS {body} LANGUAGE sql"))

    def row() -> Any:
        with db.statement_scope() as session:
            assert isinstance(session, statements.AloneSession)
            return session.run("SELECT * FROM tokens_test_row()", {})

    try:
        define("OUT a int", "'SELECT 1'")
        assert row().a == 1
        with db.statement_scope() as session:
            assert isinstance(session, statements.AloneSession)
            assert session.run("SELECT 1 AS a WHERE false", {}) is None
        define("OUT a int, OUT b text", "'SELECT 2, ''two'''")
        assert (row().a, row().b) == (2, "two")
        define("OUT b text, OUT c int", "'SELECT ''three'', 3'")
        assert (row().b, row().c) == ("three", 3)
    finally:
        with engine.begin() as conn:
            conn.execute(text("DROP FUNCTION IF EXISTS tokens_test_row()"))
