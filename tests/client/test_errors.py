"""token_worker_client.errors: one ErrorCode per code the worker can answer, one exception class
per code."""

from __future__ import annotations

import inspect
from collections import defaultdict

import pytest

from accounting import errors as domain
from accounting.errors import DomainError
from token_worker_client import errors
from token_worker_client.errors import ErrorCode, TokenRefused
from token_worker_client.models import Failure


def domain_codes() -> set[str]:
    """Every code the worker's refusals carry (each factory of accounting/errors.py, called)."""
    codes = set()
    for _, factory in inspect.getmembers(domain, inspect.isfunction):
        if factory.__module__ != domain.__name__:
            continue
        parameters = inspect.signature(factory).parameters.values()
        # a dict (the refusing limit) answers every key
        made = factory(*({"int": 1}.get(p.annotation, defaultdict(int)) for p in parameters))
        assert isinstance(made, DomainError)
        codes.add(made.code)
    return codes


def test_error_code_is_every_code_the_worker_answers() -> None:
    assert {c.value for c in ErrorCode} == domain_codes()
    assert len(ErrorCode) == 20


@pytest.mark.parametrize("code", list(ErrorCode))
def test_each_code_raises_its_own_subclass(code: ErrorCode) -> None:
    failure = Failure(error="why", error_code=code)
    refused = TokenRefused.of(failure)
    assert type(refused) is not TokenRefused and isinstance(refused, TokenRefused)
    assert (refused.code, refused.message, refused.result) == (code, "why", failure)
    assert str(refused) == f"{code}: why"
    # the class is named after the code: INSUFFICIENT_TOKENS -> InsufficientTokens
    if code is not ErrorCode.VALIDATION_ERROR:
        assert type(refused).__name__ == code.title().replace("_", "")
    assert getattr(errors, type(refused).__name__) is type(refused)


def test_one_class_per_code() -> None:
    classes = {type(TokenRefused.of(Failure(error="", error_code=c))) for c in ErrorCode}
    assert len(classes) == len(ErrorCode)
