"""tasks/base.py: payload validation, error descriptions, a transient error retried to the end,
and the operation_completed signal (which errors are transient: tests/worker/test_failures.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from celery.exceptions import Ignore, TimeLimitExceeded
from pydantic import ValidationError
from sqlalchemy import create_engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from accounting.accounts import open_account
from accounting.errors import DomainError
from models.schemas import DebitIn, UserEntriesIn
from tasks import base as tasks_base
from tasks.base import describe, validate
from tasks.movements import debit
from tests.support import free_port
from worker import signals
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
    "limit",  # v1.2: the refusing spend limit (LIMIT_EXCEEDED)
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
        "limit": None,
    }
    assert invalid["user_id"] is None  # not a string: not passed on as a user id
    assert (invalid["success"], invalid["error_code"]) == (False, "VALIDATION_ERROR")


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
        f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x",
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
