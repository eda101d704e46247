"""The producer client against the session's real workers, and a queue no worker consumes until
a test says so (a call that times out, then applies when consumption starts)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from tests.polling import wait_for
from token_worker_client import TokenClient

HELD = "held"
WORKERS = 2  # the session's (tests/conftest.py)


def urls() -> tuple[str, str]:
    return os.environ["TOKENS_BROKER_URL"], os.environ["TOKENS_RESULT_BACKEND"]


@pytest.fixture(scope="session")
def client() -> Iterator[TokenClient]:
    with TokenClient(*urls(), timeout=30) as c:
        yield c


class Held:
    """Messages sent to the ``held`` queue wait there until :meth:`release`."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.redis = redis.Redis.from_url(urls()[0])
        self.released = False

    def client(self, **options: Any) -> TokenClient:
        return TokenClient(*urls(), config={"task_default_queue": HELD}, **options)

    def waiting(self) -> int:
        return int(self.redis.llen(HELD))

    def release(self) -> None:
        """Every worker starts consuming the queue."""
        replies = self.app.control.add_consumer(HELD, reply=True, timeout=5, limit=WORKERS)
        assert len(replies) == WORKERS, replies
        self.released = True

    def drained(self) -> None:
        wait_for(lambda: self.waiting() == 0, 30, "the held queue to drain")

    def close(self) -> None:
        if self.released:
            self.app.control.cancel_consumer(HELD, reply=True, timeout=5, limit=WORKERS)
        self.redis.delete(HELD)


@pytest.fixture
def held(e2e: Celery) -> Iterator[Held]:
    queue = Held(e2e)
    try:
        yield queue
    finally:
        queue.close()
