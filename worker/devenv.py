"""Scratch environments for tests and benchmarks: a throwaway PostgreSQL database, a private
pair of Redis databases, and real ``celery -A worker worker`` processes.

Not used by the worker itself; kept here so the tests and ``bench/`` share one implementation.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TOKENS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TOKENS_TEST_REDIS", "redis://127.0.0.1:6379")
_SLOTS = 7  # Redis databases 2..15, a broker/backend pair per concurrent run
AMQP_URL = os.environ.get("TOKENS_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672")
#: The broker the scratch environment uses: "redis" (the default), "amqp" (RabbitMQ, classic
#: queues) or "quorum" (RabbitMQ, quorum queues); RabbitMQ gets a virtual host of its own.
BROKERS = ("redis", "amqp", "quorum")


def _rabbitmqctl(*args: str) -> None:
    """``rabbitmqctl`` on this machine (the tests' RabbitMQ is local, like their PostgreSQL)."""
    done = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {' '.join(args)}: {done.stderr.strip() or done.stdout}")


class Scratch:
    """A fresh database and Redis pair; ``env`` holds the TOKENS_* variables pointing at them."""

    def __init__(self, prefix: str, broker: str | None = None) -> None:
        self.broker = broker or os.environ.get("TOKENS_TEST_BROKER") or "redis"
        if self.broker not in BROKERS:
            raise ValueError(f"TOKENS_TEST_BROKER={self.broker!r}: one of {', '.join(BROKERS)}")
        self.slot = self._claim_redis_slot()
        # The pair's first database: the broker on Redis, RedBeat's schedule with RabbitMQ.
        self.redis_url = f"{REDIS_URL}/{2 * self.slot}"
        self.broker_url = self.redis_url
        self.backend_url = f"{REDIS_URL}/{2 * self.slot + 1}"
        self.db_name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        base = PG_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
        self.database_url = f"{base}/{self.db_name}"
        self.vhost: str | None = None
        self.env = {
            "TOKENS_DATABASE_URL": self.database_url,
            "TOKENS_BROKER_URL": self.broker_url,
            "TOKENS_RESULT_BACKEND": self.backend_url,
        }
        if self.broker != "redis":
            self.vhost = self.db_name
            self.broker_url = self.env["TOKENS_BROKER_URL"] = f"{AMQP_URL}/{self.vhost}"
            self.env["TOKENS_REDBEAT_REDIS_URL"] = self.redis_url
        if self.broker == "quorum":
            self.env["TOKENS_QUEUE_TYPE"] = "quorum"

    @staticmethod
    def _claim_redis_slot() -> int:
        client = redis.Redis.from_url(f"{REDIS_URL}/0")
        token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        for slot in range(1, _SLOTS + 1):
            if client.set(f"tokens-test-slot:{slot}", token, nx=True, ex=3 * 3600):
                return slot
        raise RuntimeError("every Redis scratch slot is taken; is another run stuck?")

    def export(self) -> None:
        """Point this process's settings at the scratch services (before importing the app)."""
        for key in [k for k in os.environ if k.startswith("TOKENS_")]:
            if not key.startswith("TOKENS_TEST"):
                del os.environ[key]
        os.environ.update(self.env)

    def create(self) -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        if self.vhost is not None:
            _rabbitmqctl("add_vhost", self.vhost)
            _rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        redis.Redis.from_url(self.redis_url).flushdb()
        redis.Redis.from_url(self.backend_url).flushdb()

    def destroy(self) -> None:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        if self.vhost is not None:
            _rabbitmqctl("delete_vhost", self.vhost)
        redis.Redis.from_url(self.redis_url).flushdb()
        redis.Redis.from_url(self.backend_url).flushdb()
        redis.Redis.from_url(f"{REDIS_URL}/0").delete(f"tokens-test-slot:{self.slot}")


def producer() -> Celery:
    """A producer as the contract describes it: broker and backend URLs, nothing else (and
    with RabbitMQ quorum queues, the queue type every producer must declare them with)."""
    app = Celery(
        "producer",
        broker=os.environ["TOKENS_BROKER_URL"],
        backend=os.environ["TOKENS_RESULT_BACKEND"],
    )
    if os.environ.get("TOKENS_QUEUE_TYPE") == "quorum":
        app.conf.task_default_queue_type = "quorum"
        app.conf.task_create_missing_queue_type = "quorum"  # a queue named by a send_task
    return app


class WorkerProcess:
    """``celery -A worker worker`` as a subprocess in its own process group."""

    def __init__(
        self,
        name: str,
        concurrency: int = 2,
        env: dict[str, str] | None = None,
        queues: str | None = None,
        loglevel: str = "INFO",
        log_path: Path | None = None,
        include: str | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_path or ROOT / "var" / "test-logs" / f"{name}-{os.getpid()}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, **(env or {})}
        self.argv = [
            sys.executable, "-m", "celery", "-A", "worker", "worker",
            "-n", f"{name}@%h", "-c", str(concurrency), "-l", loglevel,
            "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        if queues:
            self.argv += ["-Q", queues]
        if include:  # more task modules (a benchmark's own)
            self.argv += ["-I", include]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_ready(self, app: Celery, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited early; see {self.log_path}")
            replies = app.control.ping(timeout=0.5)
            if any(next(iter(r)).startswith(f"{self.name}@") for r in replies):
                return
        raise RuntimeError(f"worker {self.name} not ready after {timeout}s; see {self.log_path}")

    def kill(self) -> None:
        """SIGKILL the whole process group: a crash, not a shutdown."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
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
