"""The embedded default: with no TOKENS_* variable at all, ``tokens migrate`` and
``celery -A worker worker`` run on SQLite files under ./var/, and a producer configured with the
same SQLAlchemy broker and backend URLs drives a debit through them."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

BIN = Path(sys.executable).parent


@pytest.fixture
def bare_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("TOKENS_")}


@pytest.fixture
def embedded_worker(tmp_path: Path, bare_env: dict[str, str]) -> Iterator[Path]:
    """Migrate, then run a worker, from ``tmp_path`` (a bare checkout-less directory: the
    package is installed). Yields the var directory."""
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


def test_debit_through_the_embedded_broker_and_backend(embedded_worker: Path) -> None:
    var = embedded_worker
    app = Celery(
        "producer",
        broker=f"sqla+sqlite:///{var / 'broker.sqlite'}",
        backend=f"db+sqlite:///{var / 'results.sqlite'}",
    )

    def call(name: str, **kwargs: Any) -> dict[str, Any]:
        result = app.send_task(name, kwargs=kwargs)
        out: dict[str, Any] = result.get(timeout=60, interval=0.1)
        assert result.state == "SUCCESS"
        return out

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
