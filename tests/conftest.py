"""Test fixtures: a fresh PostgreSQL database and a private pair of Redis databases per run.

The environment is set before any project module is imported, so the one settings object (and so
every engine, the Celery app and the worker subprocesses) points at them.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import redis

PG_ADMIN_URL = os.environ.get("TOKENS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TOKENS_TEST_REDIS", "redis://127.0.0.1:6379")
SLOTS = 7  # Redis databases 2..15, two per concurrent test run


def _claim_redis_slot() -> int:
    """Claim a broker/backend database pair no other test run on this machine is using."""
    client = redis.Redis.from_url(f"{REDIS_URL}/0")
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    for slot in range(1, SLOTS + 1):
        if client.set(f"tokens-test-slot:{slot}", token, nx=True, ex=3 * 3600):
            return slot
    raise RuntimeError("every Redis test slot is taken; is another test run stuck?")


_SLOT = _claim_redis_slot()
BROKER_URL = f"{REDIS_URL}/{2 * _SLOT}"
BACKEND_URL = f"{REDIS_URL}/{2 * _SLOT + 1}"
DB_NAME = f"tokens_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
DATABASE_URL = (
    PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    + f"/{DB_NAME}"
)

for _key in [k for k in os.environ if k.startswith("TOKENS_") and not k.startswith("TOKENS_TEST")]:
    del os.environ[_key]
os.environ.update(
    {
        "TOKENS_DATABASE_URL": DATABASE_URL,
        "TOKENS_BROKER_URL": BROKER_URL,
        "TOKENS_RESULT_BACKEND": BACKEND_URL,
    }
)

import pytest  # noqa: E402
from celery import Celery  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from tests.support import TABLES, WorkerProcess, producer, running_workers  # noqa: E402
from worker.db import dispose_engines, get_engine, session_factory  # noqa: E402


def pytest_sessionstart(session: pytest.Session) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{DB_NAME}"')
    for url in (BROKER_URL, BACKEND_URL):
        redis.Redis.from_url(url).flushdb()
    from worker.migrate import upgrade

    upgrade()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    dispose_engines()
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    for url in (BROKER_URL, BACKEND_URL):
        redis.Redis.from_url(url).flushdb()
    redis.Redis.from_url(f"{REDIS_URL}/0").delete(f"tokens-test-slot:{_SLOT}")


@pytest.fixture
def clean_db() -> Iterator[None]:
    """Empty every table (a worker in another process must see committed data, so no
    wrapping transaction)."""
    with get_engine().begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    yield


@pytest.fixture
def session(clean_db: None) -> Iterator[Session]:
    """A session on the test database; the test commits what it wants others to see."""
    s = session_factory()()
    try:
        yield s
    finally:
        s.rollback()
        s.close()


@pytest.fixture(scope="session")
def app() -> Celery:
    return producer()


@pytest.fixture(scope="session")
def workers(app: Celery) -> Iterator[tuple[WorkerProcess, ...]]:
    """Two real worker processes (prefork, two children each) for the whole run."""
    with running_workers(app, WorkerProcess("w1"), WorkerProcess("w2")) as procs:
        yield procs


@pytest.fixture
def e2e(clean_db: None, workers: tuple[WorkerProcess, ...], app: Celery) -> Celery:
    """A clean database, running workers, and the producer app to drive them."""
    return app
