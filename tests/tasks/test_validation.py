"""Malformed payloads through real workers: each is a VALIDATION_ERROR naming the bad field, the
task itself succeeds, and nothing changes in the database."""

from __future__ import annotations

import re
from typing import Any

import pytest
from celery import Celery

from accounting.errors import DomainError
from models.schemas import MAX_TTL_SECONDS, ReserveIn
from tasks.base import validate
from tests import dbstate
from tests.dbstate import FAILURE_KEYS
from tests.support import call

DEBIT = {"user_id": "u", "amount": 10, "operation_type": "image_generation"}
CREDIT = {"user_id": "u", "amount": 10}
REFUND = {"user_id": "u", "amount": 1}
ENTRIES = {"user_id": "u"}
BIG_METADATA = {"blob": "x" * (8 * 1024)}  # 8 KiB of payload plus the JSON around it


def case(name: str, kwargs: dict[str, Any], field: str, id: str) -> Any:
    return pytest.param(name, kwargs, field, id=id)


CASES = [
    # amounts: integers only, never coerced, at most 10**12
    case("tokens.debit", {**DEBIT, "amount": True}, "amount", "amount-true"),
    case("tokens.debit", {**DEBIT, "amount": 1.5}, "amount", "amount-float"),
    case("tokens.debit", {**DEBIT, "amount": 10.0}, "amount", "amount-whole-float"),
    case("tokens.debit", {**DEBIT, "amount": "10"}, "amount", "amount-string"),
    case("tokens.debit", {**DEBIT, "amount": None}, "amount", "amount-null"),
    case("tokens.debit", {**DEBIT, "amount": 10**12 + 1}, "amount", "amount-over-max"),
    case("tokens.debit", {**DEBIT, "amount": 10**30}, "amount", "amount-huge"),
    case("tokens.credit", {**CREDIT, "amount": "10"}, "amount", "credit-amount-string"),
    case("tokens.credit", {**CREDIT, "amount": 10**30}, "amount", "credit-amount-huge"),
    case("tokens.refund", {**REFUND, "amount": 2.5}, "amount", "refund-amount-float"),
    case("tokens.reset_balance", {"user_id": "u", "new_balance": 1.5}, "new_balance",
         "reset-float"),
    case("tokens.reset_balance", {"user_id": "u", "new_balance": 10**30}, "new_balance",
         "reset-huge"),
    case("tokens.open_account", {"user_id": "n", "initial_balance": 10**12 + 1},
         "initial_balance", "initial-over-max"),
    case("tokens.open_account", {"user_id": "n", "initial_balance": "5"},
         "initial_balance", "initial-string"),
    # user_id: 1-128 characters, not blank, no control characters, a string
    case("tokens.debit", {**DEBIT, "user_id": 42}, "user_id", "user-int"),
    case("tokens.debit", {**DEBIT, "user_id": ""}, "user_id", "user-empty"),
    case("tokens.debit", {**DEBIT, "user_id": "   "}, "user_id", "user-spaces"),
    case("tokens.debit", {**DEBIT, "user_id": "\t \u3000"}, "user_id", "user-unicode-blank"),
    case("tokens.debit", {**DEBIT, "user_id": "u" * 129}, "user_id", "user-129"),
    case("tokens.debit", {**DEBIT, "user_id": "a\x00b"}, "user_id", "user-nul"),
    case("tokens.debit", {**DEBIT, "user_id": "a\nb"}, "user_id", "user-newline"),
    case("tokens.debit", {**DEBIT, "user_id": "a\x7fb"}, "user_id", "user-del"),
    case("tokens.open_account", {"user_id": "a\x00b"}, "user_id", "open-user-nul"),
    case("tokens.get_balance", {"user_id": ["u"]}, "user_id", "balance-user-list"),
    case("ledger.user_entries", {"user_id": "a\nb"}, "user_id", "entries-user-newline"),
    # metadata: a JSON object of at most 8 KiB
    case("tokens.debit", {**DEBIT, "metadata": ["a"]}, "metadata", "metadata-list"),
    case("tokens.debit", {**DEBIT, "metadata": "{}"}, "metadata", "metadata-string"),
    case("tokens.debit", {**DEBIT, "metadata": BIG_METADATA}, "metadata", "metadata-too-big"),
    case("tokens.credit", {**CREDIT, "metadata": BIG_METADATA}, "metadata", "credit-metadata-big"),
    case("tokens.debit", {**DEBIT, "metadata": {"note": "a\x00b"}}, "metadata", "metadata-nul"),
    case("tokens.debit", {**DEBIT, "metadata": {"a\x00": 1}}, "metadata", "metadata-nul-key"),
    case("tokens.refund", {**REFUND, "reason": "oops\x00"}, "reason", "reason-nul"),
    # other fields
    case("tokens.debit", {**DEBIT, "operation_type": 5}, "operation_type", "operation-int"),
    case("ledger.user_entries", {**ENTRIES, "operation_type": "a\x00"}, "operation_type",
         "entries-operation-nul"),
    case("ledger.entries_by_type", {"operation_type": "\x00"}, "operation_type",
         "by-type-operation-nul"),
    case("tokens.set_tier", {"user_id": "u", "tier": "Gift\x00"}, "tier", "tier-nul"),
    case("tokens.debit", {**DEBIT, "allow_overdraft": "yes"}, "allow_overdraft", "overdraft-str"),
    case("tokens.debit", {**DEBIT, "allow_overdraft": 1}, "allow_overdraft", "overdraft-int"),
    case("tokens.debit", {**DEBIT, "idempotency_key": "k" * 256}, "idempotency_key", "key-256"),
    case("tokens.debit", {**DEBIT, "idempotency_key": ""}, "idempotency_key", "key-empty"),
    case("tokens.debit", {**DEBIT, "idempotency_key": 7}, "idempotency_key", "key-int"),
    case("tokens.debit", {**DEBIT, "idempotency_key": "k\x00"}, "idempotency_key", "key-nul"),
    case("tokens.refund", {**REFUND, "original_entry_id": 0}, "original_entry_id", "entry-zero"),
    case("tokens.refund", {**REFUND, "original_entry_id": [1]}, "original_entry_id", "entry-list"),
    # unknown and missing kwargs
    case("tokens.debit", {**DEBIT, "amout": 10}, "amout", "unknown-kwarg"),
    case("tokens.get_balance", {"user_id": "u", "verbose": True}, "verbose", "unknown-kwarg-2"),
    case("tokens.debit", {"user_id": "u", "operation_type": "image_generation"}, "amount",
         "missing-amount"),
    case("tokens.debit", {"amount": 10, "operation_type": "image_generation"}, "user_id",
         "missing-user"),
    case("tokens.charge", {"user_id": "u"}, "operation_type", "missing-operation"),
    case("ledger.delete_old_entries", {}, "older_than", "missing-older-than"),
    # paging
    case("ledger.user_entries", {**ENTRIES, "limit": 0}, "limit", "limit-0"),
    case("ledger.user_entries", {**ENTRIES, "limit": 1001}, "limit", "limit-1001"),
    case("ledger.user_entries", {**ENTRIES, "limit": "5"}, "limit", "limit-string"),
    case("ledger.user_entries", {**ENTRIES, "offset": -1}, "offset", "offset-negative"),
    case("ledger.user_entries", {**ENTRIES, "offset": 10**30}, "offset", "offset-huge"),
    case("ledger.entries_by_type", {"operation_type": "purchase", "limit": 1001}, "limit",
         "by-type-limit-1001"),
    # dates: ISO 8601 strings
    case("ledger.user_entries", {**ENTRIES, "start_date": "yesterday"}, "start_date", "date-word"),
    case("ledger.user_entries", {**ENTRIES, "start_date": "2026-13-01T00:00:00"}, "start_date",
         "date-month-13"),
    case("ledger.user_entries", {**ENTRIES, "end_date": "2026-02-30T00:00:00Z"}, "end_date",
         "date-feb-30"),
    case("ledger.user_entries", {**ENTRIES, "end_date": ""}, "end_date", "date-empty"),
    case("ledger.user_entries", {**ENTRIES, "end_date": "1764201600"}, "end_date",
         "date-unix-time-string"),
    case("ledger.user_entries", {**ENTRIES, "end_date": "2026-06-01T24:00:00"}, "end_date",
         "date-hour-24"),
    case("ledger.user_entries", {**ENTRIES, "end_date": 1764201600}, "end_date", "date-int"),
    case("ledger.total_spent", {**ENTRIES, "start_date": "0001-01-01T00:00:00+01:00"},
         "start_date", "date-before-year-1-in-utc"),
    case("ledger.statistics", {**ENTRIES, "end_date": "9999-12-31T23:00:00-05:00"},
         "end_date", "date-after-9999-in-utc"),
    # dates: from 1970-01-01 up to (not including) 3000-01-01
    case("tokens.open_account", {"user_id": "n", "last_renewal_at": "9999-12-20T00:00:00Z"},
         "last_renewal_at", "date-far-future-renewal"),
    case("tokens.open_account", {"user_id": "n", "subscription_expires_at": "3000-01-01"},
         "subscription_expires_at", "date-year-3000"),
    case("tokens.set_tier", {"user_id": "u", "tier": "Gift",
                             "subscription_expires_at": "1969-12-31T23:59:59Z"},
         "subscription_expires_at", "date-before-1970"),
    case("ledger.user_entries", {**ENTRIES, "start_date": "1970-01-01T00:30:00+01:00"},
         "start_date", "date-1970-only-in-its-own-offset"),
    case("ledger.delete_old_entries", {"older_than": "2999-12-31T23:30:00-01:00"},
         "older_than", "date-2999-only-in-its-own-offset"),
    case("ledger.delete_old_entries", {"older_than": "soon"}, "older_than", "older-than-word"),
    case("tokens.open_account", {"user_id": "n", "subscription_expires_at": "2026-11-31T00:00:00"},
         "subscription_expires_at", "expiry-nov-31"),
    case("tokens.set_tier", {"user_id": "u", "tier": "Gift", "subscription_expires_at": 5},
         "subscription_expires_at", "expiry-int"),
    # metadata: at most 8 KiB as stored (numbers written out in full)
    case("tokens.debit", {**DEBIT, "metadata": {f"k{n}": 1e300 for n in range(40)}}, "metadata",
         "metadata-stored-past-8k"),
]  # fmt: skip


@pytest.fixture
def seeded(e2e: Celery) -> Celery:
    call(e2e, "tokens.open_account", user_id="u", initial_balance=100)
    call(e2e, "tokens.debit", user_id="u", amount=10, operation_type="image_generation")
    return e2e


def send(app: Celery, name: str, args: list[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    result = app.send_task(name, args=args, kwargs=kwargs)
    out: dict[str, Any] = result.get(timeout=30)
    assert result.state == "SUCCESS"  # a refusal is a result, never a task failure
    return out


@pytest.mark.parametrize(("name", "kwargs", "field"), CASES)
def test_malformed_kwargs_are_refused_naming_the_field(
    seeded: Celery, name: str, kwargs: dict[str, Any], field: str
) -> None:
    before = dbstate.snapshot()
    out = send(seeded, name, [], kwargs)
    assert set(out) == FAILURE_KEYS, out
    assert (out["success"], out["error_code"]) == (False, "VALIDATION_ERROR"), out
    assert out["error"].startswith("Invalid arguments: ")
    # "field: why", or "field.branch: why" for a field that takes several types
    assert re.search(rf"\b{field}[:.]", out["error"]), out["error"]
    assert dbstate.snapshot() == before


@pytest.mark.parametrize(
    ("name", "args"),
    [
        ("tokens.debit", ["u", 10, "image_generation"]),
        ("tokens.get_balance", ["u"]),
        ("ledger.reconcile", ["u"]),
    ],
)
def test_positional_arguments_are_refused(seeded: Celery, name: str, args: list[Any]) -> None:
    before = dbstate.snapshot()
    out = send(seeded, name, args, {})
    assert out["error_code"] == "VALIDATION_ERROR"
    assert "positional" in out["error"]
    assert dbstate.snapshot() == before


def test_every_bad_field_is_named(seeded: Celery) -> None:
    out = call(seeded, "tokens.debit", user_id="", amount="10", operation_type="x", extra=1)
    assert out["error_code"] == "VALIDATION_ERROR"
    for field in ("user_id: ", "amount: ", "extra: unknown argument"):
        assert field in out["error"]


@pytest.mark.parametrize(
    ("name", "kwargs", "what"),
    [
        ("tokens.debit", {**DEBIT, "amount": 0}, "Debit"),
        ("tokens.debit", {**DEBIT, "amount": -1}, "Debit"),
        ("tokens.debit", {**DEBIT, "amount": -(10**30)}, "Debit"),
        ("tokens.credit", {**CREDIT, "amount": 0}, "Credit"),
        ("tokens.credit", {**CREDIT, "amount": -10}, "Credit"),
        ("tokens.refund", {**REFUND, "amount": 0}, "Refund"),
        ("tokens.refund", {**REFUND, "amount": -10}, "Refund"),
    ],
)
def test_non_positive_amounts_are_invalid_amount(
    seeded: Celery, name: str, kwargs: dict[str, Any], what: str
) -> None:
    before = dbstate.snapshot()
    assert send(seeded, name, [], kwargs) == {
        "success": False,
        "error": f"{what} amount must be positive",
        "error_code": "INVALID_AMOUNT",
    }
    assert dbstate.snapshot() == before


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("tokens.debit", {**DEBIT, "amount": 10**12, "allow_overdraft": True}),
        ("tokens.debit", {**DEBIT, "user_id": "u" * 128, "amount": 1, "allow_overdraft": True}),
        ("tokens.debit", {**DEBIT, "idempotency_key": "k" * 255}),
        ("tokens.debit", {**DEBIT, "metadata": {"blob": "x" * (8 * 1024 - 11)}}),
        ("tokens.credit", {**CREDIT, "metadata": {"note": "line 1\nline 2\ttab"}}),
        ("ledger.user_entries", {**ENTRIES, "limit": 1000, "offset": 0}),
        ("ledger.user_entries", {**ENTRIES, "start_date": "2026-01-01T00:00:00Z"}),
        ("ledger.user_entries", {**ENTRIES, "start_date": "2026-01-01"}),
        ("ledger.user_entries", {**ENTRIES, "start_date": "1970-01-01T00:00:00Z"}),
        ("ledger.user_entries", {**ENTRIES, "end_date": "2999-12-31T23:59:59.999999Z"}),
        (
            "tokens.set_tier",
            {"user_id": "u", "tier": "Gift", "subscription_expires_at": "2999-12-31T23:59:59Z"},
        ),
    ],
)
def test_values_at_the_bounds_are_accepted(
    seeded: Celery, name: str, kwargs: dict[str, Any]
) -> None:
    out = send(seeded, name, [], kwargs)
    assert out.get("error_code") in (None, "USER_NOT_FOUND"), out


# ttl_seconds belongs to tokens.reserve; its bounds are the schema's, checked here directly.
@pytest.mark.parametrize("ttl", [0, -1, MAX_TTL_SECONDS + 1, 10**30, "900", 900.0, True])
def test_ttl_out_of_range_or_not_an_integer(ttl: Any) -> None:
    with pytest.raises(DomainError) as refused:
        validate(ReserveIn, {"user_id": "u", "amount": 1, "ttl_seconds": ttl})
    assert refused.value.code == "VALIDATION_ERROR"
    assert "ttl_seconds: " in refused.value.message


@pytest.mark.parametrize("ttl", [1, MAX_TTL_SECONDS])
def test_ttl_bounds_are_accepted(ttl: int) -> None:
    assert validate(ReserveIn, {"user_id": "u", "amount": 1, "ttl_seconds": ttl}).ttl_seconds == ttl
