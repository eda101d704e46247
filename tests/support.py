"""Test helpers: a real worker process, and a producer that knows only the contract."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("idempotency_records", "reservations", "ledger_entries", "accounts")


def producer() -> Celery:
    """A producer app as the contract describes it: broker and backend URLs, nothing else."""
    return Celery(
        "producer",
        broker=os.environ["TOKENS_BROKER_URL"],
        backend=os.environ["TOKENS_RESULT_BACKEND"],
    )


def call(app: Celery, name: str, /, **kwargs: Any) -> dict[str, Any]:
    """Send ``name`` with ``kwargs`` and wait for its result."""
    result: dict[str, Any] = app.send_task(name, kwargs=kwargs).get(timeout=60)
    return result


class WorkerProcess:
    """``celery -A worker worker`` as a subprocess, started from the repo root."""

    def __init__(
        self,
        name: str,
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.name = f"{name}@%h"
        self.hostname_prefix = f"{name}@"
        self.log_path = log_path or ROOT / "var" / "test-logs" / f"{name}-{os.getpid()}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.concurrency = concurrency
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker",
                "worker",
                "-n",
                self.name,
                "-c",
                str(self.concurrency),
                "-l",
                "INFO",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self

    def wait_ready(self, app: Celery, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited early; see {self.log_path}")
            replies = app.control.ping(timeout=0.5)
            if any(next(iter(r)).startswith(self.hostname_prefix) for r in replies):
                return
        raise RuntimeError(f"worker not ready after {timeout}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def running_workers(app: Celery, *workers: WorkerProcess) -> Iterator[tuple[WorkerProcess, ...]]:
    for w in workers:
        w.start()
    try:
        for w in workers:
            w.wait_ready(app)
        yield workers
    finally:
        for w in workers:
            w.stop()
