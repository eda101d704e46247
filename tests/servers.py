"""Private servers a fault test may kill: a Redis and a PostgreSQL of the test's own, on free
ports, with scratch data directories. Never the machine's shared servers: only a process this
module started (its pid kept here) is ever signalled.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import redis

from tests.devenv import free_port
from worker.embedded import postgres_account

PG_BIN = Path(os.environ.get("TOKENS_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _wait(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout} s")


class PrivateRedis:
    """``redis-server`` with AOF (``appendfsync`` as given, ``always`` by default) in a scratch
    directory; :meth:`kill` is a SIGKILL, :meth:`start` again reads the same AOF."""

    def __init__(self, fsync: str = "always", directory: Path | None = None) -> None:
        self.fsync = fsync
        self.port = free_port()
        self.directory = directory or Path(tempfile.mkdtemp(prefix="tokens-faults-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5)

    def start(self) -> PrivateRedis:
        if self.proc is not None and self.proc.poll() is None:
            return self  # running already
        log = (self.directory / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--appendonly", "yes",
             "--appendfsync", self.fsync, "--save", "", "--maxmemory-policy", "noeviction"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        log.close()
        _wait(lambda: self.client().ping(), 20, f"private Redis on {self.port}")
        return self

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (no final AOF write beyond what fsync kept)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def restart(self) -> None:
        self.kill()
        self.start()

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


class PrivatePostgres:
    """A PostgreSQL cluster of its own (``initdb`` of the system's PostgreSQL, or
    ``TOKENS_TEST_PG_BIN``), trust auth on 127.0.0.1; run as ``nobody`` when the tests run as
    root, as the embedded launcher does. :meth:`restart_immediate` is ``pg_ctl stop -m
    immediate`` (a crash: recovery replays the WAL) and a start."""

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="tokens-faults-pg-"))
        self.directory.chmod(0o755)
        self.data = self.directory / "data"
        self.log = self.directory / "postgres.log"
        self.account = postgres_account()

    @property
    def admin_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        done = subprocess.run(
            args, capture_output=True, text=True, check=False, **self.account.popen_args()
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip() or done.stdout}")

    def init(self) -> PrivatePostgres:
        self.data.mkdir(mode=0o700)
        self.log.touch()
        if self.account.uid is not None and self.account.gid is not None:
            for path in (self.data, self.log):
                os.chown(path, self.account.uid, self.account.gid)
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        return self.start()

    def start(self) -> PrivatePostgres:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories= "
            "-c fsync=on -c max_connections=200"
        )
        self._run(
            str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip
        _wait(self._answers, 60, "private PostgreSQL")
        return self

    def _answers(self) -> bool:
        with psycopg.connect(self.admin_url, connect_timeout=2):
            return True

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def restart_immediate(self, down_for: float = 0.0) -> None:
        self.stop("immediate")
        time.sleep(down_for)
        self.start()

    def create_database(self, name: str) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    def destroy(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


RABBIT_BIN = Path(os.environ.get("TOKENS_TEST_RABBIT_BIN", "/usr/lib/rabbitmq/bin"))


class PrivateRabbit:
    """A RabbitMQ node of its own (node name, ports, Erlang cookie, data and log directories
    under a scratch directory; no plugins); :meth:`kill` SIGKILLs its process group."""

    def __init__(self) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="tokens-faults-rabbit-"))
        self.node = f"faults{self.port}@localhost"
        cookie = self.directory / ".erlang.cookie"
        cookie.write_text(uuid.uuid4().hex.upper())
        cookie.chmod(0o400)
        (self.directory / "enabled_plugins").write_text("[].\n")
        (self.directory / "rabbitmq.conf").write_text(
            f"loopback_users = none\nlisteners.tcp.default = 127.0.0.1:{self.port}\n"
        )
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")},
            "HOME": str(self.directory),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_PID_FILE": str(self.directory / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq"),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def start(self) -> PrivateRabbit:
        with (self.directory / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(RABBIT_BIN / "rabbitmq-server")], env=self.env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _wait(self._started, 90, f"private RabbitMQ {self.node}")
        return self

    def _started(self) -> bool:
        """Whether the node runs and its broker has started (``await_startup`` fails at once
        while the node is not yet known to epmd)."""
        done = subprocess.run(
            [str(RABBIT_BIN / "rabbitmqctl"), "-n", self.node, "await_startup", "--timeout", "5"],
            env=self.env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            time.sleep(0.5)
        return done.returncode == 0

    def kill(self) -> None:
        """SIGKILL the node's process group (the Erlang VM outlives the script that started
        it, so the group is signalled even when the script has exited)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _group_alive(self.proc.pid):
            time.sleep(0.05)

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.directory, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
