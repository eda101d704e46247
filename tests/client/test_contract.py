"""token_worker_client.contract: what a call sends, and what makes sending it again safe."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime

from token_worker_client import ErrorCode, Failure
from token_worker_client.contract import (
    CAPTURE,
    DEBIT,
    GET_BALANCE,
    OPEN_ACCOUNT,
    RENEW_USER,
    USER_ENTRIES,
    Key,
    Request,
    prepare,
)


def request(spec: object, **arguments: object) -> Request:
    out = prepare(spec, {"self": None, "timeout": None, **arguments})  # type: ignore[arg-type]
    assert isinstance(out, Request), out
    return out


def test_a_mutating_call_gets_a_key_unless_given_and_keeps_it() -> None:
    debit = {"user_id": "u", "amount": 1, "operation_type": "x", "metadata": None}
    first = request(DEBIT, **debit, idempotency_key=None)
    assert first.key is Key.KWARG
    assert (
        uuid.UUID(first.kwargs["idempotency_key"])
        and first.idempotency_key == first.kwargs["idempotency_key"]
    )
    assert "metadata" not in first.kwargs  # left to the contract's default, {}
    other = request(DEBIT, **debit, idempotency_key=None)
    assert other.idempotency_key != first.idempotency_key  # one key per call
    given = request(DEBIT, **debit, idempotency_key="order-17")
    assert given.kwargs["idempotency_key"] == "order-17"
    assert "Retry with idempotency_key='order-17'" in given.retry_with


def test_a_call_keyed_by_its_task_id_takes_the_one_given() -> None:
    assert (
        request(CAPTURE, reservation_id="r", amount=None, metadata=None, task_id="t-1").task_id
        == "t-1"
    )
    renew = request(RENEW_USER, user_id="u", task_id=None)
    assert renew.key is Key.TASK_ID and uuid.UUID(renew.task_id)
    assert renew.kwargs == {"user_id": "u"} and renew.idempotency_key is None
    assert renew.retry_with == f"Retry with task_id={renew.task_id!r}."
    assert request(GET_BALANCE, user_id="u").retry_with == "Retrying is safe."


def test_dates_are_sent_as_iso_8601() -> None:
    sent = request(
        USER_ENTRIES,
        user_id="u",
        operation_type=None,
        start_date=datetime(2026, 1, 2, 3, 4, tzinfo=UTC),
        end_date=date(2026, 2, 1),
        limit=50,
        offset=0,
    )
    assert sent.kwargs["start_date"] == "2026-01-02T03:04:00+00:00"
    assert sent.kwargs["end_date"] == "2026-02-01"
    assert sent.kwargs["operation_type"] is None  # None is the contract's default: sent as is


def test_invalid_kwargs_never_leave_the_client() -> None:
    refused = prepare(OPEN_ACCOUNT, {"user_id": "", "tier": "Gift", "initial_balance": 0,
                                     "subscription_expires_at": "3000-01-01",
                                     "last_renewal_at": None})  # fmt: skip
    assert isinstance(refused, Failure) and refused.error_code is ErrorCode.VALIDATION_ERROR
    assert refused.error == (
        "Invalid arguments: user_id: String should have at least 1 character; "
        "subscription_expires_at: must be from 1970-01-01 up to (not including) 3000-01-01 UTC"
    )
