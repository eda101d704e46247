"""A bad setting, an unreachable or unmigrated database, an unreachable broker or result backend,
an unsupported URL or a partial configuration: the real ``tokens`` CLI and the real
``celery -A worker worker`` each answer with one line naming the problem and a non-zero status,
and the worker never says ready (worker/preflight.py, worker/settings.py, worker/celery.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.support import ROOT, free_port
from worker.preflight import database_problem, wait_for_database
from worker.settings import get_settings

BIN = Path(sys.executable).parent


def server_env(**overrides: str | None) -> dict[str, str]:
    """This run's environment (the scratch database, broker and backend) with ``overrides``
    (None removes a variable)."""
    env = dict(os.environ)
    for key, value in overrides.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def database_url(
    password: str | None = None, port: int | None = None, database: str | None = None
) -> str:
    url = make_url(get_settings().db_url).set(password=password, port=port, database=database)
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def empty_database() -> Iterator[str]:
    """A database that exists but was never migrated."""
    url = make_url(get_settings().db_url)
    name = f"tokens_empty_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=90, check=False
    )


CLI = [str(BIN / "tokens"), "balance", "nobody"]
WORKER = [
    str(BIN / "celery"), "-A", "worker", "worker", "-n", f"preflight-{os.getpid()}@%h",
    "-c", "1", "-l", "INFO", "--without-mingle", "--without-gossip",
]  # fmt: skip


def cli_and_worker(
    env: dict[str, str],
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str]]:
    """``tokens balance`` and ``celery -A worker worker`` with ``env``, side by side."""
    with ThreadPoolExecutor(2) as pool:
        cli, worker = (pool.submit(run, argv, env) for argv in (CLI, WORKER))
        return cli.result(), worker.result()


def worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run(WORKER, env)


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The process wrote exactly one line, to stderr, and nothing else."""
    assert out.stdout == "", out.stdout
    lines = out.stderr.splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    return lines[0]


SETTINGS: dict[str, tuple[dict[str, str | None], str]] = {
    "bad JSON": (
        {"TOKENS_PRICES": "{bad"},
        "configuration error: TOKENS_PRICES: not valid JSON (Expecting property name enclosed "
        "in double quotes: line 1 column 2 (char 1))",
    ),
    "soft limit not below the hard one": (
        {"TOKENS_TASK_SOFT_TIME_LIMIT": "150"},
        "configuration error: need TOKENS_TASK_SOFT_TIME_LIMIT (150) < TOKENS_TASK_TIME_LIMIT "
        "(150) < TOKENS_VISIBILITY_TIMEOUT (300), or a task still running is delivered a "
        "second time",
    ),
    "bad tier": (
        {"TOKENS_TIERS": '{"Gift": {"tokens": "many"}}'},
        "configuration error: TOKENS_TIERS Gift.tokens: Input should be a valid integer",
    ),
    "unsupported database": (
        {"TOKENS_DATABASE_URL": "mysql://u:pw@127.0.0.1/tokens"},
        "configuration error: TOKENS_DATABASE_URL: unsupported database 'mysql'; write "
        "postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE (PostgreSQL is the only "
        "database)",
    ),
    "partial configuration": (
        {"TOKENS_RESULT_BACKEND": None},
        "configuration error: partial configuration: TOKENS_DATABASE_URL and TOKENS_BROKER_URL "
        "are set but TOKENS_RESULT_BACKEND is not; set all three (servers) or none (the "
        "embedded default, `make run`)",
    ),
    "handler that does not import": (
        {"TOKENS_BALANCE_CHANGED_HANDLERS": '["nowhere.to_be_found"]'},
        "configuration error: TOKENS_BALANCE_CHANGED_HANDLERS: cannot load "
        "'nowhere.to_be_found': No module named 'nowhere'",
    ),
}


@pytest.mark.parametrize("case", SETTINGS)
def test_a_bad_setting_is_one_line(case: str) -> None:
    overrides, line = SETTINGS[case]
    from_cli, from_worker = cli_and_worker(server_env(**overrides))
    assert (from_cli.returncode, one_line(from_cli)) == (2, f"tokens: {line}")
    assert (from_worker.returncode, one_line(from_worker)) == (1, line)


def database_cases(empty_database: str) -> dict[str, tuple[str, str]]:
    port = free_port()
    missing = f"tokens_missing_{uuid.uuid4().hex[:6]}"
    unreachable = database_url(password="pw", port=port)
    return {
        "unreachable": (
            unreachable,
            f"database {make_url(unreachable).render_as_string()} unreachable: connection "
            f'failed: connection to server at "127.0.0.1", port {port} failed: Connection '
            "refused Is the server running on that host and accepting TCP/IP connections?",
        ),
        "missing": (
            database_url(database=missing),
            f"database {database_url(database=missing)} unreachable: connection failed: "
            f'connection to server at "127.0.0.1", port 5432 failed: FATAL:  database '
            f'"{missing}" does not exist',
        ),
        "unmigrated": (
            empty_database,
            f"database {empty_database} is not migrated: run `tokens migrate`",
        ),
    }


@pytest.mark.parametrize("case", ["unreachable", "missing", "unmigrated"])
def test_a_database_the_worker_cannot_use_is_one_line(empty_database: str, case: str) -> None:
    url, problem = database_cases(empty_database)[case]
    from_cli, from_worker = cli_and_worker(server_env(TOKENS_DATABASE_URL=url))
    assert (from_cli.returncode, one_line(from_cli)) == (3, f"tokens: {problem}")
    # The worker checked its database before it said ready: it never did.
    assert (from_worker.returncode, one_line(from_worker)) == (
        1,
        f"worker refusing to start: {problem}",
    )


@pytest.mark.parametrize("variable", ["TOKENS_BROKER_URL", "TOKENS_RESULT_BACKEND"])
def test_an_unreachable_broker_or_backend_stops_the_worker_in_one_line(variable: str) -> None:
    port = free_port()
    what = "broker" if variable == "TOKENS_BROKER_URL" else "result backend"
    out = worker(server_env(**{variable: f"redis://default:pw@127.0.0.1:{port}/0"}))
    assert (out.returncode, one_line(out)) == (
        1,
        f"worker refusing to start: {what} redis://default:***@127.0.0.1:{port}/0 unreachable: "
        f"Error 111 connecting to 127.0.0.1:{port}. Connection refused",
    )


def test_postgres_urls_are_read_as_psycopg(clean_db: None) -> None:
    url = make_url(get_settings().db_url)
    for scheme in ("postgres", "postgresql"):
        plain = url.set(drivername=scheme).render_as_string(hide_password=False)
        assert plain.startswith(f"{scheme}://")
        out = run(
            [str(BIN / "tokens"), "open-account", f"via-{scheme}"],
            server_env(TOKENS_DATABASE_URL=plain),
        )
        assert out.returncode == 0, out.stderr
        assert '"created": true' in out.stdout


def test_wait_for_database_is_bounded() -> None:
    url = database_url(port=free_port())
    with pytest.raises(Exception, match=r"unreachable after 1 s: connection failed"):
        wait_for_database(1, url)
    wait_for_database(1)  # reachable: returns at once
    assert database_problem() is None
