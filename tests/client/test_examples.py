"""client/examples/: the client's README or the producer guide shows each verbatim, and each runs
against a real worker with no URL given (TOKENS_BROKER_URL and TOKENS_RESULT_BACKEND, which the
test session exports, point the client at it)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import cast

import pytest
from celery import Celery
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests import dbstate
from tests.client.conftest import HELD, Held, urls
from tests.support import ROOT, call
from token_worker_client import AsyncTokenClient

EXAMPLES = ROOT / "client" / "examples"


@pytest.mark.parametrize("name", ["sync_example.py", "async_example.py", "fastapi_app.py"])
def test_the_docs_show_the_example_verbatim(name: str) -> None:
    source = (EXAMPLES / name).read_text()
    docs = ("client/README.md", "docs/producers.md")
    assert any(f"```python\n{source}```\n" in (ROOT / doc).read_text() for doc in docs)


def run(name: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",  # nothing of the repository on the path but the installed distributions
    )
    return done.stdout


def test_the_sync_and_async_examples_run(e2e: Celery) -> None:
    assert run("sync_example.py").splitlines() == [
        "MovementOut True",
        "70",
        "INSUFFICIENT_TOKENS Insufficient tokens. Required: 500, Available: 70",
    ]
    assert run("async_example.py") == "62 [True, False]\n"
    assert dbstate.balance("alice") == 62


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def http(e2e: Celery) -> Iterator[TestClient]:
    with TestClient(load("fastapi_app.py").app) as client:  # runs the lifespan: a real client
        yield client


def test_the_fastapi_example_charges_and_maps_refusals(e2e: Celery, http: TestClient) -> None:
    call(e2e, "tokens.open_account", user_id="alice", initial_balance=15)
    charged = http.post("/users/alice/charges/image_generation", headers={"Idempotency-Key": "o-1"})
    assert charged.status_code == 200
    body = charged.json()
    assert (body["amount"], body["new_balance"], body["replayed"]) == (-10, 5, False)
    again = http.post("/users/alice/charges/image_generation", headers={"Idempotency-Key": "o-1"})
    assert again.status_code == 200
    assert again.json() == {**body, "replayed": True}  # the same charge, not a second one

    short = http.post("/users/alice/charges/image_generation")
    assert (short.status_code, short.json()["detail"]) == (
        402,
        {
            "error_code": "INSUFFICIENT_TOKENS",
            "error": "Insufficient tokens. Required: 10, Available: 5",
        },
    )
    missing = http.post("/users/bob/charges/image_generation")
    assert (missing.status_code, missing.json()["detail"]["error_code"]) == (404, "USER_NOT_FOUND")
    unknown = http.post("/users/alice/charges/teleport")
    assert (unknown.status_code, unknown.json()["detail"]["error"]) == (
        422,
        "Unknown operation type: teleport",
    )
    free = http.post("/users/alice/charges/refund")
    assert (free.status_code, free.json()["detail"]["error_code"]) == (422, "NOT_CHARGEABLE")
    blank = http.post("/users/%20/charges/image_generation")
    assert (blank.status_code, blank.json()["detail"]["error"]) == (
        422,
        "Invalid arguments: user_id: must not be blank",
    )
    assert dbstate.balance("alice") == 5


def test_the_fastapi_example_answers_a_timeout_with_the_key_to_retry(
    e2e: Celery, held: Held, http: TestClient
) -> None:
    call(e2e, "tokens.open_account", user_id="alice", initial_balance=15)
    app = cast(FastAPI, http.app)
    real = app.state.tokens
    slow = AsyncTokenClient(*urls(), timeout=0.2, retries=0, config={"task_default_queue": HELD})
    app.state.tokens = slow  # its messages wait in the held queue: no answer in time
    try:
        lost = http.post("/users/alice/charges/image_generation")
    finally:
        app.state.tokens = real
        assert http.portal is not None
        http.portal.call(slow.aclose)
    assert lost.status_code == 504
    key = lost.json()["detail"]["retry_with_idempotency_key"]
    retried = http.post("/users/alice/charges/image_generation", headers={"Idempotency-Key": key})
    assert retried.status_code == 200 and retried.json()["new_balance"] == 5
