"""worker/metrics/: the session's two real workers (prefork, two pool processes each) serve
their metrics over HTTP; a known mix of tasks moves every series by an exact amount.

The mix: four debits that wait on a row lock the test holds (so every pool process of both
workers is busy with one, and two more debits wait in the broker's queue), refusals of four
codes, a credit and its replay, a charge, a batch of one good and one refused item, a poison
message, two reservations, a renewal sweep over three tiers and a reconcile that finds one
mismatch. Counters are compared as differences between scrapes taken with the workers idle, summed
over both workers as Prometheus would.
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from celery import Celery
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from accounting import accounts, limits, movements
from tests import dbstate
from tests.polling import wait_for
from tests.support import ROOT, WorkerProcess, call, free_port, running_workers, waiting_on_locks
from worker.db import get_engine, session_scope
from worker.metrics import (
    SCRAPE_TIMEOUT,
    BrokerQueues,
    DatabaseReads,
    ScrapeCollector,
    exported_names,
)
from worker.metrics.definitions import LIMIT_REFUSALS
from worker.metrics.handlers import on_operation_completed

Labels = tuple[tuple[str, str], ...]
Scrape = dict[tuple[str, Labels], float]


def scrape(worker: WorkerProcess) -> Scrape:
    url = f"http://127.0.0.1:{worker.env['TOKENS_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        body = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }


def series(snapshot: Scrape, name: str) -> dict[Labels, float]:
    return {labels: v for (n, labels), v in snapshot.items() if n == name}


def summed(snapshots: list[Scrape]) -> Scrape:
    total: Scrape = {}
    for snapshot in snapshots:
        for key, value in snapshot.items():
            total[key] = total.get(key, 0.0) + value
    return total


def grew(before: Scrape, after: Scrape, name: str) -> dict[Labels, float]:
    """How much each series of ``name`` grew between two scrapes (unchanged ones left out)."""
    old = series(before, name)
    return {k: v - old.get(k, 0.0) for k, v in series(after, name).items() if v != old.get(k, 0.0)}


def lab(**labels: str) -> Labels:
    return tuple(sorted(labels.items()))


COUNTERS = ("_total", "_count")


def settled(workers: tuple[WorkerProcess, ...]) -> list[Scrape]:
    """Scrapes of every worker once nothing runs or waits and the counters stand still."""

    def idle() -> list[Scrape]:
        first = [scrape(w) for w in workers]
        time.sleep(0.3)
        again = [scrape(w) for w in workers]
        busy = sum(s[("celery_worker_tasks_active", ())] for s in again)
        queued = sum(v for s in again for v in series(s, "celery_queue_length").values())
        moving = [{k: v for k, v in s.items() if k[0].endswith(COUNTERS)} for s in (*first, *again)]
        if busy or queued or moving[: len(workers)] != moving[len(workers) :]:
            return []
        return again

    return wait_for(idle, 30, "workers idle with their counters still")


def per_process(directory: Path, name: str, labels: Labels) -> dict[int, float]:
    """The value of one series in each process's own counter file (before they are merged)."""
    values: dict[int, float] = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        merged = MultiProcessCollector.merge([str(path)], accumulate=False)  # type: ignore[no-untyped-call]
        for metric in merged:
            for s in metric.samples:
                if s.name == name and tuple(sorted(s.labels.items())) == labels:
                    values[pid] = s.value
    return values


@contextmanager
def row_locked(user_id: str) -> Iterator[None]:
    """Hold ``user_id``'s account row locked, as an in-flight movement would."""
    with get_engine().connect() as holder:
        holder.execute(text("SELECT 1 FROM accounts WHERE user_id = :u FOR UPDATE"), {"u": user_id})
        try:
            yield
        finally:
            holder.rollback()


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return value


DEBIT = "tokens.debit"
IMG, CHAT = "image_generation", "chatgpt_message"


@pytest.fixture
def accounts_for_the_mix(e2e: Celery) -> Iterator[int]:
    """Accounts written in-process (so only the mix reaches the workers); yields the last
    ledger entry id before the mix."""
    now = datetime.now(UTC)
    with session_scope() as s:
        for user_id, balance in (("m-rich", 1000), ("m-poor", 5), ("m-lock", 100), ("m-odd", 0)):
            accounts.open_account(s, user_id, initial_balance=balance, last_renewal_at=now)
        for tier, n in (("Gift", 3), ("Professional", 2), ("Business", 1)):
            for i in range(n):
                accounts.open_account(s, f"due-{tier}-{i}", tier=tier)
    with get_engine().connect() as conn:
        yield int(conn.execute(text("SELECT max(id) FROM ledger_entries")).scalar_one())


def test_a_known_mix_moves_every_series_exactly(
    e2e: Celery, workers: tuple[WorkerProcess, ...], accounts_for_the_mix: int
) -> None:
    app, mark = e2e, accounts_for_the_mix
    before = settled(workers)
    files = {w.name: Path(w.env["TOKENS_METRICS_DIR"]) for w in workers}
    debit_ok = lab(task=DEBIT, operation_type=IMG, outcome="ok")
    per_child_before = {
        w.name: per_process(files[w.name], "tokens_operations_total", debit_ok) for w in workers
    }

    # Four debits wait on the lock: both workers take two each (prefetch 1 x 2 processes), so
    # every pool process holds one; two more wait in the broker's queue.
    with row_locked("m-lock"):
        blocked = [
            app.send_task(DEBIT, kwargs={"user_id": "m-lock", "amount": 10, "operation_type": IMG})
            for _ in range(4)
        ]
        wait_for(lambda: waiting_on_locks() == 4, 30, "four debits waiting on the row lock")
        queued = [
            app.send_task(DEBIT, kwargs={"user_id": "m-rich", "amount": 5, "operation_type": CHAT})
            for _ in range(2)
        ]

        def both_see_two_queued() -> list[Scrape]:
            now = [scrape(w) for w in workers]
            lengths = [s[("celery_queue_length", lab(queue_name="celery"))] for s in now]
            return now if lengths == [2.0, 2.0] else []

        during = wait_for(both_see_two_queued, 30, "two debits waiting in the queue")
        assert [s[("celery_worker_tasks_active", ())] for s in during] == [2.0, 2.0]
    assert all(r.get(timeout=30)["success"] for r in blocked + queued)

    refusals: dict[str, dict[str, Any]] = {
        "INSUFFICIENT_TOKENS": {"user_id": "m-poor", "amount": 100, "operation_type": IMG},
        "USER_NOT_FOUND": {"user_id": "nobody", "amount": 1, "operation_type": IMG},
        "UNKNOWN_OPERATION_TYPE": {
            "user_id": "m-rich",
            "amount": 1,
            "operation_type": "no-such-type",
        },
        "VALIDATION_ERROR": {"user_id": "m-rich", "amount": "10", "operation_type": IMG},
    }
    for code, kwargs in refusals.items():
        assert call(app, DEBIT, **kwargs)["error_code"] == code
    credit = {"user_id": "m-rich", "amount": 50, "idempotency_key": "k-1"}
    assert call(app, "tokens.credit", **credit)["replayed"] is False
    assert call(app, "tokens.credit", **credit)["replayed"] is True
    assert call(app, "tokens.charge", user_id="m-rich", operation_type=IMG)["amount"] == -10
    batch = call(
        app,
        "tokens.debit_batch",
        debits=[
            {"user_id": "m-rich", "amount": 10, "operation_type": IMG},
            {"user_id": "m-poor", "amount": 100, "operation_type": IMG},
        ],
    )
    assert (batch["applied"], batch["refused"]) == (1, 1)
    poison = call(app, DEBIT, user_id="m-rich", amount=1, operation_type=IMG, metadata=nested(40))
    assert poison["error_code"] == "VALIDATION_ERROR"
    for amount in (30, 20):
        assert call(app, "tokens.reserve", user_id="m-rich", amount=amount)["success"]
    swept = call(app, "renewals.sweep")
    assert (swept["successful"], swept["skipped"], swept["failed"]) == (6, 0, 0)
    dbstate.execute("UPDATE accounts SET tokens_balance = 1 WHERE user_id = 'm-odd'")
    assert len(call(app, "ledger.reconcile")["mismatches"]) == 1
    months = call(app, "ledger.make_months")

    after = settled(workers)
    old, new = summed(before), summed(after)

    assert grew(old, new, "tokens_operations_total") == {
        debit_ok: 4,
        lab(task=DEBIT, operation_type=CHAT, outcome="ok"): 2,
        lab(task=DEBIT, operation_type=IMG, outcome="INSUFFICIENT_TOKENS"): 1,
        lab(task=DEBIT, operation_type=IMG, outcome="USER_NOT_FOUND"): 1,
        # Only configured operation types become label values.
        lab(task=DEBIT, operation_type="other", outcome="UNKNOWN_OPERATION_TYPE"): 1,
        lab(task=DEBIT, operation_type=IMG, outcome="VALIDATION_ERROR"): 1,
        lab(task="tokens.credit", operation_type="purchase", outcome="ok"): 2,
        lab(task="tokens.charge", operation_type=IMG, outcome="ok"): 1,
        lab(task="tokens.debit_batch", operation_type="", outcome="ok"): 1,
        lab(task="tokens.reserve", operation_type="", outcome="ok"): 2,
        # A sweep that fans out reports once, through its totals task.
        lab(task="renewals.sweep_chunk", operation_type="", outcome="ok"): 1,
        lab(task="renewals.sweep_totals", operation_type="", outcome="ok"): 1,
        lab(task="ledger.reconcile", operation_type="", outcome="ok"): 1,
        lab(task="ledger.make_months", operation_type="", outcome="ok"): 1,
    }
    assert grew(old, new, "tokens_replays_total") == {
        lab(task="tokens.credit", operation_type="purchase"): 1
    }
    moved = grew(old, new, "tokens_moved_total")
    assert moved == {
        lab(operation_type=IMG, direction="debit"): 4 * 10 + 10 + 10,  # debits, charge, batch
        lab(operation_type=CHAT, direction="debit"): 2 * 5,
        lab(operation_type="purchase", direction="credit"): 50,  # the replay moved nothing
        lab(operation_type="monthly_reset", direction="credit"): 3 * 100 + 2 * 2000 + 10000,
    }
    credits = sum(v for k, v in moved.items() if ("direction", "credit") in k)
    debits = sum(v for k, v in moved.items() if ("direction", "debit") in k)
    ledger_sum = dbstate.rows(
        "SELECT sum(tokens_amount) AS s FROM ledger_entries WHERE id > :mark", mark=mark
    )[0]["s"]
    assert credits - debits == ledger_sum  # the metrics agree with the ledger
    assert grew(old, new, "tokens_batch_items_total") == {
        lab(operation_type=IMG, outcome="ok"): 1,
        lab(operation_type=IMG, outcome="INSUFFICIENT_TOKENS"): 1,
    }
    assert grew(old, new, "tokens_renewals_total") == {
        lab(tier="Gift", outcome="renewed"): 3,
        lab(tier="Professional", outcome="renewed"): 2,
        lab(tier="Business", outcome="renewed"): 1,
    }
    assert grew(old, new, "tokens_messages_refused_total") == {lab(reason="depth"): 1}

    # Histograms: one observation per task.
    durations = grew(old, new, "tokens_task_duration_seconds_count")
    assert durations[lab(task=DEBIT)] == 4 + 2 + 4
    assert durations[lab(task="renewals.sweep_totals")] == 1
    waits = grew(old, new, "celery_task_queue_wait_seconds_count")
    assert waits[lab(name=DEBIT, queue_name="celery")] == 10
    received = grew(old, new, "celery_task_received_total")
    assert received == grew(old, new, "celery_task_started_total")
    assert received[lab(name=DEBIT, queue_name="celery")] == 10  # not the refused poison message
    succeeded = grew(old, new, "celery_task_succeeded_total")
    # renewals.sweep replaced itself with its chunks and totals: it has no success of its own.
    assert set(received) - set(succeeded) == {lab(name="renewals.sweep", queue_name="celery")}
    assert grew(old, new, "celery_task_runtime_count") == succeeded
    assert grew(old, new, "celery_task_failed_total") == {}
    assert grew(old, new, "celery_task_sent_total") == {
        lab(name="renewals.sweep_chunk", queue_name="renewals"): 1,
        lab(name="renewals.sweep_totals", queue_name="renewals"): 1,
    }

    # Read on each scrape, the same on every worker.
    for s in after:
        assert s[("tokens_reservations_active", ())] == 2
        assert s[("tokens_reserved_tokens", ())] == 50
        assert series(s, "tokens_last_sweep_users") == {
            lab(outcome="renewed"): 6,
            lab(outcome="skipped"): 0,
            lab(outcome="failed"): 0,
        }
        assert s[("tokens_last_sweep_chunks_pending", ())] == 0
        assert time.time() - s[("tokens_last_sweep_timestamp_seconds", ())] < 120
        assert series(s, "tokens_scrape_source_up") == {
            lab(source="broker"): 1,
            lab(source="database"): 1,
        }
    # The last full reconcile, as the worker that ran it last reports it.
    latest = max(after, key=lambda s: s.get(("tokens_last_reconcile_timestamp_seconds", ()), 0))
    assert latest[("tokens_reconcile_mismatches", ())] == 1
    # The ledger's months, as the last ledger.make_months left them.
    until = ("tokens_ledger_months_until_timestamp_seconds", ())
    latest = max(after, key=lambda s: s.get(until, 0))
    assert latest[until] == datetime.fromisoformat(months["until"]).timestamp()
    assert latest[until] > time.time() + 60 * 86400
    assert latest[("tokens_ledger_entries_outside_months", ())] == 0

    # Multiprocess: each worker's total is the sum of its processes' own files, and both pool
    # processes of each worker counted one of the blocked debits.
    for w, snapshot in zip(workers, after, strict=True):
        per_child = per_process(files[w.name], "tokens_operations_total", debit_ok)
        assert sum(per_child.values()) == snapshot[("tokens_operations_total", debit_ok)]
        assert w.proc is not None
        children = {
            pid: v - per_child_before[w.name].get(pid, 0.0)
            for pid, v in per_child.items()
            if pid != w.proc.pid
        }
        assert sorted(v for v in children.values() if v) == [1.0, 1.0], children

    # Every name served is one the alert rules and the dashboard may use (tests/test_ops.py).
    assert {name for name, _ in new} <= exported_names()


# --- the server and what it reads on each scrape --------------------------------------------------


def test_a_worker_whose_metrics_port_is_taken_refuses_to_start(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        w = WorkerProcess(
            f"metrics-taken-{os.getpid()}",
            concurrency=1,
            env={
                "TOKENS_METRICS_PORT": str(port),
                "TOKENS_METRICS_ADDR": "127.0.0.1",
                "TOKENS_METRICS_DIR": str(tmp_path / "metrics"),
            },
            queues=f"metrics-taken-{os.getpid()}",
            log_path=tmp_path / "worker.log",
        )
        w.start()
        try:
            assert w.proc is not None
            assert w.proc.wait(60) != 0
        finally:
            w.stop()
    refusals = [ln for ln in w.log_path.read_text().splitlines() if "refusing to start" in ln]
    assert refusals == [
        f"worker refusing to start: metrics port 127.0.0.1:{port}: Address already in use"
    ]


def test_unreachable_sources_are_reported_down_not_raised(tmp_path: Path) -> None:
    broker = Celery("down", broker="redis://127.0.0.1:1/0")
    collector = ScrapeCollector(
        tmp_path,
        BrokerQueues(broker, ["celery"]),
        DatabaseReads("postgresql+psycopg://postgres@127.0.0.1:1/nothing"),
    )
    started = time.monotonic()
    families = {f.name: f.samples for f in collector.collect()}
    assert time.monotonic() - started < 3 * SCRAPE_TIMEOUT
    up = {s.labels["source"]: s.value for s in families["tokens_scrape_source_up"]}
    assert up == {"broker": 0, "database": 0}
    assert families["celery_queue_length"] == families["tokens_reservations_active"] == []


def test_debt_is_read_on_each_scrape(tmp_path: Path) -> None:
    """Users in debt and what they owe, read from the database when scraped (so every worker
    agrees, and a restart loses nothing): an overdraft makes debt, the next credit pays it."""
    with session_scope() as session:
        for user in ("d1", "d2", "fine"):
            accounts.open_account(session, user, initial_balance=10)
        movements.debit(session, "d1", 25, "image_generation", allow_overdraft=True)
        movements.debit(session, "d2", 13, "image_generation", allow_overdraft=True)
        movements.debit(session, "fine", 5, "image_generation")
    collector = ScrapeCollector(
        tmp_path,
        BrokerQueues(Celery("scrape", broker="redis://127.0.0.1:6379/0"), ["celery"]),
        DatabaseReads(get_engine().url.render_as_string(hide_password=False)),
    )

    def read() -> tuple[float, float]:
        families = {f.name: f.samples for f in collector.collect()}
        return families["tokens_accounts_in_debt"][0].value, families["tokens_debt_tokens"][0].value

    try:
        assert read() == (2, 15 + 3)
        with session_scope() as session:
            movements.credit(session, "d1", 20)
        assert read() == (1, 3)
    finally:
        collector.database.forget()


def test_spend_limits_near_and_at_their_max_are_read_on_each_scrape(
    tmp_path: Path, clean_db: None
) -> None:
    """By period, whatever the number of limits: a day limit at 95 % is near, a minute limit
    spent whole is near and reached; a refusal counts in tokens_limit_refusals_total."""
    with session_scope() as session:
        accounts.open_account(session, "lp", initial_balance=1000)
        accounts.open_account(session, "lm", parent_id="lp")
        limits.set_limit(session, "lp", "daily", 100, "day")
        limits.set_limit(session, "lm", "burst", 50, "minute", rolling=True)
        limits.set_limit(session, "lm", "weekly", 1000, "week")
        movements.debit(session, "lm", 45, "image_generation")
        movements.debit(session, "lp", 5, "image_generation")
        movements.debit(session, "lm", 5, "image_generation")
    collector = ScrapeCollector(
        tmp_path,
        BrokerQueues(Celery("scrape", broker="redis://127.0.0.1:6379/0"), ["celery"]),
        DatabaseReads(get_engine().url.render_as_string(hide_password=False)),
    )
    try:
        families = {f.name: f.samples for f in collector.collect()}
    finally:
        collector.database.forget()
    near = {s.labels["period"]: s.value for s in families["tokens_limits_near"]}
    reached = {s.labels["period"]: s.value for s in families["tokens_limits_reached"]}
    assert near == {"day": 0, "minute": 1, "week": 0}  # 55 of 100 a day: not near
    assert reached == {"day": 0, "minute": 1, "week": 0}
    before = LIMIT_REFUSALS.labels("minute")._value.get()
    limit = {"period": "minute", "name": "burst"}
    on_operation_completed(
        operation="tokens.debit",
        operation_type="image_generation",
        amount=1,
        success=False,
        replayed=False,
        duration=0.01,
        error_code="LIMIT_EXCEEDED",
        limit=limit,
    )
    assert LIMIT_REFUSALS.labels("minute")._value.get() == before + 1


def test_a_dead_process_in_progress_count_is_forgotten(tmp_path: Path) -> None:
    """A pool process killed mid-task (hard time limit, OOM) never decrements its in-progress
    gauge; the next scrape drops the files of every process no longer alive. Counters stay."""
    dead = subprocess.Popen(["true"])  # a process that has exited (and was reaped)
    dead.wait()
    files = [
        f"gauge_livesum_{dead.pid}.db",
        f"counter_{dead.pid}.db",
        f"gauge_livesum_{os.getpid()}.db",
    ]
    for name in files:
        (tmp_path / name).write_bytes(b"")
    ScrapeCollector(tmp_path, cast(Any, None), cast(Any, None))._forget_dead_processes()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files[1:])


def test_the_handlers_cost_a_small_share_of_a_task() -> None:
    """``python -m bench.metrics_handlers`` (the README's figure), in a process of its own since
    prometheus_client must be imported after the multiprocess directory is set."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.metrics_handlers", "--tasks", "2000"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    micros = float(done.stdout.split(": ")[1].split(" us")[0])
    assert 0 < micros < 1000  # a debit costs ~4000 us of worker CPU; loaded machines vary


def test_expired_tokens_are_counted_once_committed(
    e2e: Celery, workers: tuple[WorkerProcess, ...]
) -> None:
    """``grants.expire`` and a debit that expires its user's due grant first both count."""
    soon = datetime.now(UTC) + timedelta(hours=1)
    with session_scope() as s:
        for user_id in ("x-1", "x-2", "x-3"):
            accounts.open_account(s, user_id, initial_balance=100)
            movements.credit(s, user_id, 40, expires_at=soon)
            movements.credit(s, user_id, 2, grant_kind="promo", expires_at=soon)
    dbstate.execute("UPDATE grants SET expires_at = clock_timestamp() WHERE expires_at IS NOT NULL")
    before = settled(workers)
    debit = {"user_id": "x-3", "amount": 1, "operation_type": IMG}
    assert call(e2e, DEBIT, **debit)["new_balance"] == 99
    assert call(e2e, "grants.expire") == {"success": True, "expired": 4, "tokens_expired": 84}
    old, new = summed(before), summed(settled(workers))
    assert grew(old, new, "tokens_expired_total") == {(): 3 * 42}
    assert grew(old, new, "tokens_grants_expired_total") == {(): 6}
    assert grew(old, new, "tokens_moved_total")[
        lab(operation_type="expiry", direction="debit")
    ] == (3 * 42)


def test_rabbitmq_queue_lengths_are_ready_message_counts() -> None:
    """On RabbitMQ the lengths come from a passive declare (creating nothing); a queue not
    declared yet counts 0, and the channel RabbitMQ closes for it does not break the next read."""
    from kombu import Connection, Exchange, Queue  # type: ignore[attr-defined]

    from tests.devenv import AMQP_URL

    url = f"{AMQP_URL}//"
    name = f"tokens-metrics-test-{uuid.uuid4().hex[:8]}"
    missing = f"tokens-metrics-absent-{uuid.uuid4().hex[:8]}"  # read first (sorted)
    with Connection(url) as conn:  # type: ignore[no-untyped-call]
        exchange = Exchange(name, type="direct")  # type: ignore[no-untyped-call]
        queue = Queue(name, exchange, routing_key=name, auto_delete=False)  # type: ignore[no-untyped-call]
        producer = conn.Producer()
        for i in range(3):
            producer.publish({"n": i}, exchange=queue.exchange, routing_key=name, declare=[queue])
        try:
            queues = BrokerQueues(Celery("scrape", broker=url), [name, missing])
            assert queues.lengths() == {name: 3, missing: 0}
            assert queues.lengths() == {name: 3, missing: 0}
            queues.forget()
        finally:
            queue(conn.channel()).delete()  # type: ignore[no-untyped-call]


# --- the listener's bounds ----------------------------------------------------------------------

# What the metrics listener may take of a worker's main process, whatever connects to it: the
# descriptors of this many connections at once, each closed within IDLE_CLOSE seconds when it
# sends no request. The process's other descriptors (the coalescer's and the scrape's database
# and broker connections) are left alone.
LISTENER_CONNECTIONS = 16
IDLE_CLOSE = 10.0


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def try_scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as response:
            body: str = response.read().decode()
            return body
    except OSError:
        return None


def listening_on(port: int) -> set[str]:
    """The IPv4 addresses something on this host listens on at ``port`` (/proc/net/tcp)."""
    found: set[str] = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, _, hex_port = local.partition(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def closed_by_peer(conn: socket.socket, deadline: float) -> bool:
    conn.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        return conn.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_cannot_starve_the_worker(app: Celery, tmp_path: Path) -> None:
    """300 idle TCP connections to a worker's metrics port, the main process allowed 100
    descriptors more than it holds: the listener takes a bounded few of them, a scrape still
    answers, and every idle connection is closed. (It took a thread and a descriptor for each
    connection, for as long as the client kept it: the process ran out of descriptors, and the
    listener, like everything else in it that needed one, stopped answering.) The address is
    loopback, the default."""
    port = free_port()
    name = f"metrics-idle-{os.getpid()}"
    env = {"TOKENS_METRICS_PORT": str(port), "TOKENS_METRICS_DIR": str(tmp_path / "metrics")}
    w = WorkerProcess(name, concurrency=1, env=env, queues=name, log_path=tmp_path / "w.log")
    held: list[tuple[socket.socket, float]] = []  # each connection, and when it was made
    with running_workers(app, w):
        assert w.proc is not None
        pid = w.proc.pid
        assert wait_for(lambda: try_scrape(port), 30, "a first scrape")  # its connections open
        baseline = descriptors(pid)
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (baseline + 100, hard))
        try:
            taken = 0  # the most descriptors the process held beyond the baseline meanwhile
            for i in range(300):
                try:
                    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
                except OSError:
                    break
                held.append((conn, time.monotonic()))
                if i % 10 == 0:
                    taken = max(taken, descriptors(pid) - baseline)
            taken = max(taken, descriptors(pid) - baseline)
            assert taken <= LISTENER_CONNECTIONS + 2, f"{taken} descriptors more than before"
            assert len(held) == 300  # none left waiting to be accepted
            scraped = wait_for(lambda: try_scrape(port), IDLE_CLOSE + 5, "a scrape")
            assert scraped and "tokens_scrape_source_up" in scraped
            still_open = [c for c, at in held if not closed_by_peer(c, at + IDLE_CLOSE)]
            assert still_open == []
        finally:
            for conn, _ in held:
                conn.close()
        assert listening_on(port) == {"127.0.0.1"}
