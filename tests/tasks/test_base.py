"""tasks/base.py: payload validation, error descriptions, which database errors are retried, the
retry backoff, and the operation_completed signal."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from celery.exceptions import Ignore, SoftTimeLimitExceeded, TimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session

from accounting.accounts import open_account
from accounting.errors import DomainError
from models.schemas import DebitIn, UserEntriesIn
from tasks import base as tasks_base
from tasks.base import describe, is_transient, validate
from tasks.movements import debit
from worker import signals
from worker.db import get_engine
from worker.settings import get_settings
from worker.signals import operation_completed

# --- validate / describe --------------------------------------------------------------------


def test_validate_returns_the_payload() -> None:
    p = validate(DebitIn, {"user_id": "u", "amount": 5, "operation_type": "sora_image"})
    assert (p.user_id, p.amount, p.operation_type, p.metadata, p.allow_overdraft) == (
        "u",
        5,
        "sora_image",
        {},
        False,
    )


def test_validate_refuses_what_json_cannot_carry() -> None:
    for bad in (float("nan"), {1, 2}, b"u"):
        with pytest.raises(DomainError) as refused:
            validate(DebitIn, {"user_id": "u", "amount": bad, "operation_type": "sora_image"})
        assert refused.value.code == "VALIDATION_ERROR"
        assert refused.value.message.startswith("Invalid arguments: not JSON")


def test_validate_names_each_bad_field() -> None:
    with pytest.raises(DomainError) as refused:
        validate(DebitIn, {"user_id": " ", "amount": True, "nope": 1})
    assert refused.value.code == "VALIDATION_ERROR"
    assert refused.value.message == (
        "Invalid arguments: user_id: must not be blank; amount: Input should be a valid integer; "
        "operation_type: Field required; nope: unknown argument"
    )


def real_validation_error(schema: Any, raw: str) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        schema.model_validate_json(raw, strict=True)
    return caught.value


def test_describe_strips_the_value_error_prefix_and_names_extra_arguments() -> None:
    exc = real_validation_error(UserEntriesIn, '{"user_id": "a\\nb", "limit": 0, "x": 1}')
    assert describe(exc) == (
        "Invalid arguments: user_id: must not contain control characters; "
        "limit: Input should be greater than or equal to 1; x: unknown argument"
    )


def test_describe_names_the_kwargs_when_the_whole_payload_is_wrong() -> None:
    exc = real_validation_error(UserEntriesIn, "[1, 2]")
    assert describe(exc).startswith("Invalid arguments: kwargs: ")


# --- is_transient ---------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # nothing listens once the socket is closed


def raised(action: Any) -> BaseException:
    try:
        action()
    except Exception as exc:
        return exc
    raise AssertionError("expected an exception")


def test_database_unreachable_is_transient() -> None:
    engine = create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x",
        connect_args={"connect_timeout": 2},
    )
    exc = raised(engine.connect)
    assert isinstance(exc, OperationalError)
    assert is_transient(exc)


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


# --- operation_completed --------------------------------------------------------------------


@pytest.fixture
def completed() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append({"sender": sender, **kwargs})

    operation_completed.connect(receiver, weak=False)
    try:
        yield seen
    finally:
        operation_completed.disconnect(receiver)


SIGNAL_FIELDS = {
    "sender",
    "signal",
    "operation",
    "task_id",
    "user_id",
    "operation_type",
    "amount",
    "success",
    "replayed",
    "duration",
    "error",
    "error_code",
}


def test_operation_completed_after_a_movement(
    session: Session, completed: list[dict[str, Any]]
) -> None:
    open_account(session, "u", initial_balance=100)
    session.commit()
    out = debit.apply(kwargs={"user_id": "u", "amount": 10, "operation_type": "sora_image"}).get()
    assert out["success"] and out["new_balance"] == 90
    [event] = completed
    assert set(event) == SIGNAL_FIELDS
    assert event["operation"] == event["sender"] == "tokens.debit"
    assert (event["user_id"], event["amount"], event["success"]) == ("u", -10, True)
    assert (event["operation_type"], event["replayed"]) == ("sora_image", False)
    assert isinstance(event["task_id"], str)
    assert (event["error"], event["error_code"]) == (None, None)
    assert isinstance(event["duration"], float) and event["duration"] > 0


def test_operation_completed_after_a_refusal(
    session: Session, completed: list[dict[str, Any]]
) -> None:
    open_account(session, "u", initial_balance=5)
    session.commit()
    out = debit.apply(kwargs={"user_id": "u", "amount": 10, "operation_type": "sora_image"}).get()
    assert out["error_code"] == "INSUFFICIENT_TOKENS"
    bad = debit.apply(kwargs={"user_id": 7, "amount": 10, "operation_type": "sora_image"}).get()
    assert bad["error_code"] == "VALIDATION_ERROR"
    refusal, invalid = completed
    assert refusal == {
        "sender": "tokens.debit",
        "signal": operation_completed,
        "operation": "tokens.debit",
        "task_id": refusal["task_id"],
        "user_id": "u",
        "operation_type": "sora_image",
        "amount": 10,  # the amount asked for
        "success": False,
        "replayed": False,
        "duration": refusal["duration"],
        "error": "Insufficient tokens. Required: 10, Available: 5",
        "error_code": "INSUFFICIENT_TOKENS",
    }
    assert invalid["user_id"] is None  # not a string: not passed on as a user id
    assert (invalid["success"], invalid["error_code"]) == (False, "VALIDATION_ERROR")


# --- time limits are failures ----------------------------------------------------------------


def unreachable_database_error() -> OperationalError:
    engine = create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x",
        connect_args={"connect_timeout": 2},
    )
    exc = raised(engine.connect)
    assert isinstance(exc, OperationalError)
    return exc


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


# --- operation_completed once per outcome, retries apart ---------------------------------------


@pytest.fixture
def retried() -> Iterator[list[dict[str, Any]]]:
    seen: list[dict[str, Any]] = []

    def receiver(sender: Any, **kwargs: Any) -> None:
        seen.append({"sender": sender, **kwargs})

    signals.operation_retried.connect(receiver, weak=False)
    try:
        yield seen
    finally:
        signals.operation_retried.disconnect(receiver)


def test_a_transient_error_retried_to_the_end_completes_once(
    monkeypatch: pytest.MonkeyPatch,
    completed: list[dict[str, Any]],
    retried: list[dict[str, Any]],
) -> None:
    # Every attempt meets a real OperationalError: the database is unreachable.
    engine = create_engine(
        f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/x",
        connect_args={"connect_timeout": 2},
    )

    @contextmanager
    def unreachable() -> Iterator[Session]:
        with Session(engine) as session:
            yield session

    # tokens.debit runs alone (statement_scope); the contract's other tasks in a session_scope.
    monkeypatch.setattr(tasks_base, "statement_scope", unreachable)
    monkeypatch.setattr(tasks_base, "session_scope", unreachable)
    kwargs = {"user_id": "u", "amount": 10, "operation_type": "sora_image"}
    outcome = debit.apply(kwargs=kwargs)  # eager: each retry runs at once
    assert outcome.state == "FAILURE" and isinstance(outcome.result, OperationalError)
    attempts = get_settings().task_max_retries
    assert [e["attempt"] for e in retried] == list(range(1, attempts + 1))
    assert {e["operation"] for e in retried} == {"tokens.debit"}
    assert all("OperationalError" in e["error"] for e in retried)
    [done] = completed
    assert (done["success"], done["error_code"], done["user_id"], done["amount"]) == (
        False,
        "DATABASE_ERROR",
        "u",
        10,
    )
    assert "OperationalError" in done["error"]


def test_a_replaced_task_reports_nothing_itself(
    session: Session, completed: list[dict[str, Any]], retried: list[dict[str, Any]]
) -> None:
    # Task.replace raises Ignore in a worker: the replacement finishes under this task id and
    # reports the outcome.
    def replaced(_session: Session, _payload: Any, _task_id: str | None) -> Any:
        raise Ignore("Replaced by new task")

    kwargs = {"user_id": "u", "amount": 10, "operation_type": "sora_image"}
    with pytest.raises(Ignore):
        debit.execute(DebitIn, replaced, (), kwargs)
    assert (completed, retried) == ([], [])


def test_a_hard_time_limit_completes_once_from_the_main_process(
    completed: list[dict[str, Any]],
) -> None:
    # The pool process was killed; Celery calls on_failure in the worker's main process.
    kwargs = {"user_id": "u", "amount": 10, "operation_type": "sora_image"}
    debit.on_failure(TimeLimitExceeded(4), "task-1", (), kwargs, None)
    [done] = completed
    assert (done["operation"], done["user_id"], done["amount"], done["success"]) == (
        "tokens.debit",
        "u",
        10,
        False,
    )
    assert done["error_code"] == "TIME_LIMIT_EXCEEDED"
    assert "TimeLimitExceeded" in done["error"]
    # Any other failure is reported where it happened, in the pool process, not again here.
    debit.on_failure(ValueError("x"), "task-2", (), kwargs, None)
    assert len(completed) == 1
