"""The embedded default: with no TOKENS_* variable at all, ``tokens migrate`` and
``celery -A worker worker`` run on SQLite files under ./var/, and a producer configured with the
same SQLAlchemy broker and backend URLs drives a debit through them. ``make run`` starts it with
beat, and a round trip takes well under 0.2 s (worker/sqlpolling.py)."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.polling import wait_for
from tests.support import ROOT
from worker.config import celery_config
from worker.settings import Settings

BIN = Path(sys.executable).parent


@pytest.fixture
def bare_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TOKENS_")}


@pytest.fixture
def embedded_worker(tmp_path: Path, bare_env: dict[str, str]) -> Iterator[Path]:
    """Migrate, then run a worker, from ``tmp_path`` (a bare checkout-less directory: the
    package is installed). Yields the var directory."""
    yield from _embedded(tmp_path, bare_env)


def _embedded(tmp_path: Path, bare_env: dict[str, str]) -> Iterator[Path]:
    for _ in range(2):  # migrate is safe to repeat
        migrated = subprocess.run(
            [str(BIN / "tokens"), "migrate"],
            cwd=tmp_path,
            env=bare_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert migrated.returncode == 0, migrated.stderr
        assert "sqlite" in migrated.stdout
    log = tmp_path / "worker.log"
    name = f"embedded-{os.getpid()}@%h"
    argv = [str(BIN / "celery"), "-A", "worker", "worker", "-l", "INFO", "-n", name]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*argv, "--without-mingle", "--without-gossip"],
            cwd=tmp_path,
            env=bare_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield tmp_path / "var"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        print(log.read_text(errors="replace")[-3000:])  # shown only if the test failed


def embedded_producer(var: Path) -> Celery:
    return Celery(
        "producer",
        broker=f"sqla+sqlite:///{var / 'broker.sqlite'}",
        backend=f"db+sqlite:///{var / 'results.sqlite'}",
    )


def caller(app: Celery) -> Callable[..., dict[str, Any]]:
    def call(name: str, **kwargs: Any) -> dict[str, Any]:
        result = app.send_task(name, kwargs=kwargs)
        out: dict[str, Any] = result.get(timeout=60, interval=0.1)
        assert result.state == "SUCCESS"
        return out

    return call


def test_debit_through_the_embedded_broker_and_backend(embedded_worker: Path) -> None:
    var = embedded_worker
    call = caller(embedded_producer(var))

    opened = call("tokens.open_account", user_id="u", initial_balance=100)
    assert (opened["created"], opened["tokens_balance"]) == (True, 100)
    out = call("tokens.debit", user_id="u", amount=30, operation_type="image_generation")
    assert out == {
        "success": True,
        "user_id": "u",
        "operation_type": "image_generation",
        "amount": -30,
        "balance_before": 100,
        "new_balance": 70,
        "tokens_spent": 30,
        "ledger_entry_id": "2",
        "replayed": False,
    }
    refused = call("tokens.debit", user_id="u", amount=71, operation_type="image_generation")
    assert refused["error"] == "Insufficient tokens. Required: 71, Available: 70"
    entries = call("ledger.user_entries", user_id="u")["entries"]
    assert [e["tokens_amount"] for e in entries] == [-30, 100]
    assert entries[0]["created_at"].endswith("+00:00")

    with sqlite3.connect(var / "tokens.sqlite") as db:
        assert db.execute("SELECT tokens_balance FROM accounts").fetchall() == [(70,)]
        assert db.execute("SELECT SUM(tokens_amount) FROM ledger_entries").fetchone() == (70,)


@pytest.fixture
def embedded_sweeper(tmp_path: Path, bare_env: dict[str, str]) -> Iterator[Path]:
    """The embedded default, planning sweeps in chunks of 2 users."""
    yield from _embedded(tmp_path, {**bare_env, "TOKENS_SWEEP_CHUNK_SIZE": "2"})


def test_a_sweep_fans_out_on_the_embedded_default(embedded_sweeper: Path) -> None:
    """Without Redis, chords run through celery.chord_unlock over the SQLite result backend:
    the sweep's chunks and its totals still come back under the sweep's own task id."""
    var = embedded_sweeper
    app = embedded_producer(var)
    call = caller(app)
    for user_id in ("a", "b", "c", "d", "e"):
        assert call("tokens.open_account", user_id=user_id)["created"]
    assert call("renewals.sweep", dry_run=True)["successful"] == 5
    swept = app.send_task("renewals.sweep", kwargs={})
    assert swept.get(timeout=60, interval=0.1) == {
        "success": True,
        "total_processed": 5,
        "successful": 5,
        "failed": 0,
        "skipped": 0,
        "errors": [],
    }
    assert app.AsyncResult(f"{swept.id}:2").get(timeout=10)["successful"] == 1
    assert call("renewals.sweep")["total_processed"] == 0
    assert call("renewals.due")["user_ids"] == []
    with sqlite3.connect(var / "tokens.sqlite") as db:
        assert db.execute(
            "SELECT count(*), count(DISTINCT user_id) FROM ledger_entries WHERE kind = 'renewal'"
        ).fetchone() == (5, 5)
        assert db.execute("SELECT count(*) FROM sweep_chunks").fetchone() == (3,)


@pytest.fixture
def make_run(tmp_path: Path, bare_env: dict[str, str]) -> Iterator[tuple[Path, Path]]:
    """``make run`` (without its install step: the package is installed), its var directory in
    ``tmp_path`` and reservations expired every second, so beat has something to send at once.
    Yields the var directory and the log."""
    var, log = tmp_path / "var", tmp_path / "make-run.log"
    env = {**bare_env, "TOKENS_VAR_DIR": str(var), "TOKENS_RESERVATION_EXPIRY_SECONDS": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["make", "-o", "install", "run", f"BIN={BIN}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield var, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        print(log.read_text(errors="replace")[-3000:])  # shown only if the test failed


def test_make_run_serves_tasks_and_runs_beat(make_run: tuple[Path, Path]) -> None:
    var, log = make_run
    wait_for(lambda: " ready." in log.read_text(errors="replace"), 60, "the worker ready")
    embedded = Settings(var_dir=var, database_url=None, broker_url=None, result_backend=None)
    app = Celery("producer", set_as_current=False)
    app.config_from_object(celery_config(embedded))
    assert app.send_task("health.ping").get(timeout=60)["success"]

    # Beat runs inside the worker (-B) and the worker takes what it sends.
    wait_for(
        lambda: "Task reservations.expire[" in log.read_text(errors="replace"),
        30,
        "a reservations.expire sent by beat and run",
    )
    text = log.read_text(errors="replace")
    assert "beat: Starting..." in text
    assert "Sending due task reservations-expire (reservations.expire)" in text


def test_a_round_trip_takes_well_under_a_fifth_of_a_second() -> None:
    """Stock kombu and Celery poll the SQLite broker every 1 s and the results every 0.5 s: a
    median round trip of about 1 s. Through the project's own app, as the README's example uses
    it (``.get(timeout=…)``, no interval), it must stay well under 0.2 s."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.embedded_roundtrip", "--pings", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    median = re.search(r"10 pings: median (\d+) ms", out)
    assert median, out
    assert int(median.group(1)) < 200, out
