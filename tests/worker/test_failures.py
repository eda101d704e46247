"""worker/failures.py: which errors are retried (a task's retry, the coalescer's requeue), the
``error_code`` of a failure and its one-line text."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from sqlalchemy import create_engine, text
from sqlalchemy.exc import (
    DataError,
    IntegrityError,
    OperationalError,
    ProgrammingError,
    ResourceClosedError,
)
from sqlalchemy.orm import Session

from accounting.accounts import open_account
from accounting.errors import DomainError
from tests.support import free_port
from worker.db import get_engine
from worker.failures import failure_code, is_transient, one_line
from worker.settings import get_settings

# --- is_transient ---------------------------------------------------------------------------


def raised(action: Any) -> BaseException:
    try:
        action()
    except Exception as exc:
        return exc
    raise AssertionError("expected an exception")


def unreachable_database_error() -> OperationalError:
    engine = create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
        connect_args={"connect_timeout": 2},
    )
    exc = raised(engine.connect)
    assert isinstance(exc, OperationalError)
    return exc


def test_database_unreachable_is_transient() -> None:
    assert is_transient(unreachable_database_error())


def test_connection_killed_by_the_server_is_transient(clean_db: None) -> None:
    engine = create_engine(get_settings().db_url, pool_size=1, max_overflow=0)
    try:
        with engine.connect() as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            with get_engine().begin() as admin:
                admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            exc = raised(lambda: conn.execute(text("SELECT 1")))
        assert isinstance(exc, OperationalError)
        assert exc.connection_invalidated
        assert is_transient(exc)
    finally:
        engine.dispose()


def test_serialization_failure_is_transient(session: Session) -> None:
    open_account(session, "u", initial_balance=1)
    session.commit()
    with get_engine().connect() as a, get_engine().connect() as b:
        a.execute(text("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ"))
        a.execute(text("SELECT tokens_balance FROM accounts WHERE user_id = 'u'"))
        b.execute(text("UPDATE accounts SET tokens_balance = 2 WHERE user_id = 'u'"))
        b.commit()
        stmt = text("UPDATE accounts SET tokens_balance = 3 WHERE user_id = 'u'")
        exc = raised(lambda: a.execute(stmt))
        a.rollback()
    assert isinstance(exc, OperationalError)
    assert isinstance(exc.orig, psycopg.errors.SerializationFailure)
    assert is_transient(exc)


def test_errors_a_retry_cannot_fix_are_not_transient(session: Session) -> None:
    open_account(session, "u")
    session.commit()
    duplicate = raised(lambda: open_account_row(session))
    session.rollback()
    assert isinstance(duplicate, IntegrityError)
    bad_sql = raised(lambda: session.execute(text("SELECT nope FROM accounts")))
    session.rollback()
    assert isinstance(bad_sql, ProgrammingError)
    nul = raised(lambda: session.execute(text("SELECT CAST(:v AS text)"), {"v": "a\x00"}))
    session.rollback()
    assert isinstance(nul, DataError)
    for exc in (duplicate, bad_sql, nul, ValueError("x"), DomainError("USER_NOT_FOUND", "x")):
        assert not is_transient(exc), exc


def open_account_row(session: Session) -> None:
    session.execute(
        text(
            "INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, tokens_spent,"
            " created_at, updated_at) VALUES ('u', 'Gift', 0, 0, 0, now(), now())"
        )
    )


# --- time limits are failures, never retried ------------------------------------------------


@pytest.mark.parametrize("limit", [SoftTimeLimitExceeded(), TimeLimitExceeded(4)])
def test_database_error_caused_by_a_time_limit_is_not_transient(limit: BaseException) -> None:
    def raised_while_handling(interruption: BaseException) -> OperationalError:
        try:
            raise interruption
        except type(interruption):
            try:
                raise unreachable_database_error()  # chained implicitly, as a failed rollback is
            except OperationalError as exc:
                return exc
        raise AssertionError("unreachable")

    # Raised while the time limit was being handled (__context__), as a failed rollback is.
    during = raised_while_handling(limit)
    assert isinstance(during, OperationalError) and during.__context__ is limit
    assert not is_transient(during)
    # Raised from it (__cause__), and further down a chain.
    caused = unreachable_database_error()
    caused.__cause__ = limit
    assert not is_transient(caused)
    outer = unreachable_database_error()
    outer.__context__ = caused
    assert not is_transient(outer)
    assert not is_transient(limit)
    assert is_transient(unreachable_database_error())  # the same error alone still is


# --- the lock and statement timeouts the coalescer's connections carry -----------------------


@pytest.mark.parametrize(
    ("setting", "blocked"),
    [
        ("lock_timeout", "SELECT 1 FROM accounts WHERE user_id = 'u' FOR UPDATE"),
        ("statement_timeout", "SELECT pg_sleep(5)"),
    ],
)
def test_a_lock_or_statement_timeout_is_transient(
    session: Session, setting: str, blocked: str
) -> None:
    # The coalescer sends a debit back to the queue on exactly these (worker/coalescer.py).
    open_account(session, "u")
    session.commit()
    with get_engine().connect() as holder, get_engine().connect() as waiter:
        holder.execute(text("SELECT 1 FROM accounts WHERE user_id = 'u' FOR UPDATE"))
        waiter.execute(text(f"SET {setting} = 200"))
        exc = raised(lambda: waiter.execute(text(blocked)))
        waiter.rollback()
        holder.rollback()
    assert isinstance(exc, OperationalError)
    assert isinstance(exc.orig, psycopg.errors.LockNotAvailable | psycopg.errors.QueryCanceled)
    assert is_transient(exc)


# --- failure_code and one_line ----------------------------------------------------------------


def test_failure_codes() -> None:
    caused = unreachable_database_error()
    caused.__context__ = SoftTimeLimitExceeded()
    assert failure_code(caused) == "TIME_LIMIT_EXCEEDED"
    assert failure_code(TimeLimitExceeded(4)) == "TIME_LIMIT_EXCEEDED"
    assert failure_code(unreachable_database_error()) == "DATABASE_ERROR"
    assert failure_code(ResourceClosedError("closed")) == "DATABASE_ERROR"  # not a DBAPIError
    assert failure_code(ValueError("x")) == "INTERNAL_ERROR"


def test_one_line_keeps_the_first_line_of_the_text() -> None:
    assert one_line(unreachable_database_error()).startswith("OperationalError: ")
    assert "\n" not in one_line(unreachable_database_error())
    assert one_line(ValueError("\n  first\nsecond")) == "ValueError: first"
    assert one_line(ValueError("x" * 400)) == "ValueError: " + "x" * 300
    assert one_line(ValueError()) == one_line(ValueError(" \n ")) == "ValueError"
