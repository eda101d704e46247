"""Scratch environments for tests and benchmarks: a throwaway PostgreSQL database, a private
pair of Redis databases, and real ``celery -A worker worker`` processes; or the embedded default
started exactly as ``make run`` starts it (``TOKENS_TEST_BROKER=embedded``).

Not used by the worker itself; kept here so the tests and ``bench/`` share one implementation.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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
#: "embedded": no server of the machine's; ``python -m worker.embedded run`` (what ``make run``
#: runs) in a directory of its own starts PostgreSQL and Valkey from their wheels, migrates and
#: runs a worker with beat, on free ports (TOKENS_EMBEDDED_*_PORT, so a developer's own make run
#: on the default ports is left alone).
BROKERS = ("redis", "amqp", "quorum", "embedded")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class EmbeddedRun:
    """``python -m worker.embedded run`` (``make run`` without its install step) started in
    ``directory`` with no TOKENS_* variable but ``env``; its output in make-run.log there."""

    def __init__(self, directory: Path, env: dict[str, str], *args: str) -> None:
        self.directory = directory
        self.log = directory / "make-run.log"
        bare = {k: v for k, v in os.environ.items() if not k.startswith("TOKENS_")}
        self.env = {**bare, **env}
        with self.log.open("ab") as out:
            self.offset = out.tell()  # an earlier run's lines stay before it
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "worker.embedded", "run", *args],
                cwd=directory,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        """This run's output so far."""
        with self.log.open("rb") as log:
            log.seek(self.offset)
            return log.read().decode(errors="replace")

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.text()[-2000:]
                raise RuntimeError(f"make run not ready (exit {self.proc.poll()}):\n{tail}")
            time.sleep(0.1)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM to the launcher alone (it stops the worker, then the servers); its exit
        status. Whatever server it left (killed before it could stop them) is stopped too."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            raise
        finally:
            subprocess.run(
                [sys.executable, "-m", "worker.embedded", "stop"],
                cwd=self.directory,
                env=self.env,
                capture_output=True,
                timeout=timeout,
                check=False,
            )


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
        self.run: EmbeddedRun | None = None
        if self.broker == "embedded":
            # Reachable by nobody, who runs PostgreSQL when the tests run as root.
            self.directory = Path(tempfile.mkdtemp(prefix=f"{prefix}-embedded-"))
            self.directory.chmod(0o755)
            self.env = {
                "TOKENS_EMBEDDED_PG_PORT": str(free_port()),
                "TOKENS_EMBEDDED_VALKEY_PORT": str(free_port()),
            }
            return
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
        if self.broker == "embedded":
            self.run = EmbeddedRun(self.directory, self.env)
            self.run.wait_ready()
            return
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        if self.vhost is not None:
            _rabbitmqctl("add_vhost", self.vhost)
            _rabbitmqctl("set_permissions", "-p", self.vhost, "guest", ".*", ".*", ".*")
        redis.Redis.from_url(self.redis_url).flushdb()
        redis.Redis.from_url(self.backend_url).flushdb()

    def destroy(self) -> None:
        if self.broker == "embedded":
            if self.run is not None:
                self.run.stop()
            shutil.rmtree(self.directory, ignore_errors=True)
            return
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
    from worker.settings import get_settings  # read once the scratch variables are set

    app = Celery("producer", broker=get_settings().broker, backend=get_settings().backend)
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
