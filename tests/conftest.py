"""Test fixtures: a fresh PostgreSQL database and a private pair of Redis databases per run.

The environment is set before any project module is imported, so the one settings object (and so
every engine, the Celery app and the worker subprocesses) points at them.
"""

from __future__ import annotations

from collections.abc import Iterator

from tests.devenv import Scratch

SCRATCH = Scratch("tokens_test")
SCRATCH.export()

import pytest  # noqa: E402
from celery import Celery  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from tests.support import TABLES, WorkerProcess, free_port, producer, running_workers  # noqa: E402
from worker.db import dispose_engines, get_engine, session_factory  # noqa: E402


def pytest_sessionstart(session: pytest.Session) -> None:
    SCRATCH.create()
    from worker.migrate import upgrade

    upgrade()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    dispose_engines()
    SCRATCH.destroy()


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
def workers(
    app: Celery, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, ...]]:
    """Two real worker processes (prefork, two children each) for the whole run, each serving
    its metrics on a port of its own (``metrics_port``; tests/worker/test_metrics.py)."""

    def worker(name: str) -> WorkerProcess:
        env = {
            "TOKENS_METRICS_PORT": str(free_port()),
            "TOKENS_METRICS_ADDR": "127.0.0.1",
            "TOKENS_METRICS_DIR": str(tmp_path_factory.mktemp(f"metrics-{name}")),
        }
        return WorkerProcess(name, env=env)

    with running_workers(app, worker("w1"), worker("w2")) as procs:
        yield procs


@pytest.fixture
def e2e(clean_db: None, workers: tuple[WorkerProcess, ...], app: Celery) -> Celery:
    """A clean database, running workers, and the producer app to drive them."""
    return app
