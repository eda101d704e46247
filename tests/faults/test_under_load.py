"""Faults injected while producers send debits through the typed client, on a private stack
(tests/faults/stack.py): what each must keep (issue 25).

- every debit whose send the client reported done (a result came back) is applied exactly once;
- every debit the broker acknowledged is applied, without the client retrying it (nothing the
  broker acknowledged is lost);
- every debit whose send failed is applied at most once, and once when sent again with its key;
- the client's retries with the same key never apply twice; the ledger reconciles.

The short form (500 debits a fault; the faults marked ``full_only`` left out) runs with the
rest of the suite; ``make faults``
(``TOKENS_TEST_FAULTS=full``) sends 5,000 a fault and prints the table (tests/faults/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting.accounts import open_account
from tests.faults.load import Load, Report, during
from tests.faults.stack import FAST_REDELIVERY, Stack
from tests.servers import PG_BIN, RABBIT_BIN, PrivateRabbit
from tests.worker.tcp_proxy import TcpProxy
from token_worker_client import TokenClient
from token_worker_client.models import ReconcileOut

pytestmark = [pytest.mark.faults, pytest.mark.timeout(600)]

FULL = os.environ.get("TOKENS_TEST_FAULTS") == "full"
DEBITS = 5000 if FULL else 500
#: When the fault starts: after this share of the debits was sent.
AT = 0.3
#: How long a link stays cut.
CUT_SECONDS = 10.0 if FULL else 5.0
REPORTS: list[Report] = []
#: What only ``make faults`` runs: the short form keeps to about two minutes in ``make test``.
full_only = pytest.mark.skipif(not FULL, reason="make faults (TOKENS_TEST_FAULTS=full) only")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    if shutil.which("redis-server") is None or not (PG_BIN / "initdb").exists():
        pytest.skip(f"needs redis-server on the PATH and PostgreSQL's initdb in {PG_BIN}")
    s = Stack("always").start()
    try:
        yield s
    finally:
        s.stop()


def check(report: Report) -> None:
    REPORTS.append(report)
    summary = f"{report.row()} outcomes={report.outcomes} notes={report.notes}"
    assert report.applied_twice == 0, summary
    assert report.answered_not_applied == 0, summary
    assert report.lost_acknowledged == 0, summary
    assert report.final_applied_twice == 0, summary
    assert report.final_applied_once == report.sent, summary
    assert report.reconcile_mismatches == 0, summary


def slug(name: str) -> str:
    """A worker's node name for the fault ``name``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") + f"-{os.getpid()}"


def run(
    stack: Stack,
    name: str,
    fault: Callable[[], object],
    env: dict[str, str],
    broker_url: str | None = None,
    config: dict[str, Any] | None = None,
) -> Report:
    """One worker (two processes) of ``stack`` with ``env``, a load, ``fault`` during it."""
    worker = stack.worker(slug(name), env)
    with stack.running(worker, broker_url=broker_url):
        load = Load(stack, DEBITS, broker_url=broker_url, config=config)
        load.open_accounts()
        ended = during(load.start(), AT, fault)
        return load.report(name, ended)


@pytest.mark.parametrize("fsync", ["always", pytest.param("everysec", marks=full_only)])
def test_redis_killed_and_restarted(stack: Stack, fsync: str) -> None:
    """SIGKILL, 2 s down, restarted on its AOF. ``always`` is the compose default; ``everysec``
    loses nothing to a killed process either (what Redis wrote is in the page cache): its
    window is a machine crash, which this suite cannot inject."""
    stack.redis.client().config_set("appendfsync", fsync)

    def fault() -> None:
        stack.redis.kill()
        time.sleep(2)
        stack.redis.start()  # the command line's appendfsync always again

    check(
        run(
            stack, f"Redis SIGKILL (appendfsync {fsync})", fault, {**stack.env(), **FAST_REDELIVERY}
        )
    )


def test_postgres_restarted_with_an_immediate_shutdown(stack: Stack) -> None:
    check(run(stack, "PostgreSQL immediate restart", stack.pg.restart_immediate, stack.env()))


def cut_for(proxy: TcpProxy, how: str) -> Callable[[], None]:
    """The fault: the proxy's connections reset (``cut``) or silently forgotten (``drop``),
    new ones refused, for :data:`CUT_SECONDS`; then it forwards again."""

    def fault() -> None:
        proxy.cut() if how == "cut" else proxy.drop()
        time.sleep(CUT_SECONDS)
        proxy.open()

    return fault


@pytest.mark.parametrize("how", ["cut", pytest.param("drop", marks=full_only)])
def test_worker_to_postgres_link(stack: Stack, how: str) -> None:
    """``drop``: a statement in flight waits on a connection nothing answers; the soft time
    limit (10 s here) ends it, the task fails, the producer is told."""
    proxy = stack.proxy_to_postgres()
    env = {**stack.env(proxy), **FAST_REDELIVERY}
    name = f"worker-PostgreSQL link {how} {CUT_SECONDS:g} s"
    check(run(stack, name, cut_for(proxy, how), env))


@pytest.mark.parametrize("how", ["cut", pytest.param("drop", marks=full_only)])
def test_worker_to_broker_link(stack: Stack, how: str) -> None:
    """``drop``: before the broker transport's socket timeout (worker/config.py), the worker's
    loop waited on an acknowledgement nothing would answer, for good. With it, a 10 s drop still
    stopped the worker now and then, two ways (worker/reliable.py): a socket kombu closed stayed
    in the loop's epoll (a pool process forked meanwhile held it) and its events were read on
    the replacement subscriber, with no timeout; or the acknowledgements that timed out kept
    their places in the prefetch window, and the channel asked for no message again."""
    proxy = stack.proxy_to_redis()
    env = {**stack.env(broker_proxy=proxy), **FAST_REDELIVERY}
    name = f"worker-broker link {how} {CUT_SECONDS:g} s"
    check(run(stack, name, cut_for(proxy, how), env))


def test_worker_killed_every_two_seconds(stack: Stack) -> None:
    """SIGKILL of the whole worker (main process and pool) every 2 s, started again at once;
    what a killed worker held comes back after the visibility timeout (20 s here)."""
    env = {**stack.env(), **FAST_REDELIVERY}
    worker = stack.worker(slug("killed"), env)
    kills = 5 if FULL else 3
    with stack.running(worker):
        load = Load(stack, DEBITS)
        load.open_accounts()
        stop = threading.Event()

        def fault() -> None:
            for _ in range(kills):
                time.sleep(2)
                worker.kill()
                worker.start()
            stop.set()

        ended = during(load.start(), AT, fault)
        report = load.report(f"worker SIGKILL every 2 s ({kills}x)", ended, within=90)
    check(report)


@pytest.mark.parametrize("queue_type", [pytest.param("classic", marks=full_only), "quorum"])
def test_rabbitmq_killed_and_restarted(stack: Stack, queue_type: str) -> None:
    """A RabbitMQ node of the test's own (results stay in the stack's Redis), SIGKILLed and
    started again; producers publish with confirms, so a publish that returned is on disk."""
    if not (RABBIT_BIN / "rabbitmq-server").exists():
        pytest.skip(f"needs rabbitmq-server in {RABBIT_BIN}")
    rabbit = PrivateRabbit().start()
    try:
        env = {**stack.env(), "TOKENS_BROKER_URL": rabbit.url, "TOKENS_QUEUE_TYPE": queue_type}
        config: dict[str, Any] = {"broker_transport_options": {"confirm_publish": True}}
        if queue_type == "quorum":
            config |= {
                "task_default_queue_type": "quorum",
                "task_create_missing_queue_type": "quorum",
            }

        def fault() -> None:
            rabbit.kill()
            rabbit.start()

        name = f"RabbitMQ SIGKILL ({queue_type} queues, confirms)"
        check(run(stack, name, fault, env, broker_url=rabbit.url, config=config))
    finally:
        rabbit.destroy()


# --- PostgreSQL restarted while the background work runs ---------------------------------------

SWEEP_USERS = 5000 if FULL else 500
SWEEP_LINES: list[str] = []


def open_accounts_due(stack: Stack, prefix: str, count: int) -> list[str]:
    """``count`` accounts of 100 tokens, last renewed 40 days ago (due), opened in-process."""
    users = [f"{prefix}-{i}" for i in range(count)]
    renewed = datetime.now(UTC) - timedelta(days=40)
    with Session(stack.engine) as session:
        for user in users:
            open_account(session, user, initial_balance=100, last_renewal_at=renewed)
        session.commit()
    return users


def entries_per_user(stack: Stack, prefix: str, operation: str) -> Counter[str]:
    rows = stack.rows(
        "SELECT user_id, count(*) FROM ledger_entries WHERE user_id LIKE :p"
        " AND operation_type = :op GROUP BY user_id",
        p=f"{prefix}-%",
        op=operation,
    )
    return Counter({user: int(n) for user, n in rows})


def in_background(work: Callable[[], object]) -> threading.Thread:
    def guarded() -> None:
        with contextlib.suppress(Exception):  # the database restarts under it: a failure
            work()

    thread = threading.Thread(target=guarded, daemon=True)
    thread.start()
    return thread


def settled(stack: Stack, prefix: str, operation: str, want: int, within: float) -> Counter[str]:
    """Until ``want`` users have their entry, or nothing changed for 10 s."""
    deadline, last, since = time.monotonic() + within, -1, time.monotonic()
    counts: Counter[str] = Counter()
    while time.monotonic() < deadline:
        counts = entries_per_user(stack, prefix, operation)
        if len(counts) >= want:
            break
        if len(counts) != last:
            last, since = len(counts), time.monotonic()
        elif time.monotonic() - since > 10:
            break
        time.sleep(0.5)
    return counts


def reconciles(client: TokenClient) -> int:
    out = client.reconcile()
    return len(out.mismatches) if isinstance(out, ReconcileOut) else -1


def test_postgres_restarted_mid_renewal_sweep(stack: Stack) -> None:
    """The sweep in chunks of 50 users; PostgreSQL restarted once a third have renewed. A chunk
    cut off retries; sending the sweep again (what an operator does) renews nobody twice."""
    prefix = f"sweep{uuid.uuid4().hex[:6]}"
    users = open_accounts_due(stack, prefix, SWEEP_USERS)
    env = {**stack.env(), **FAST_REDELIVERY, "TOKENS_SWEEP_CHUNK_SIZE": "50"}
    worker = stack.worker(slug("sweep"), env)
    with (
        stack.running(worker),
        TokenClient(stack.broker_url, stack.backend_url, timeout=120, retries=0) as client,
    ):
        in_background(client.sweep)
        deadline = time.monotonic() + 120
        while len(entries_per_user(stack, prefix, "monthly_reset")) < len(users) // 3:
            assert time.monotonic() < deadline, "the sweep did not get a third of the way"
            time.sleep(0.05)
        before = len(entries_per_user(stack, prefix, "monthly_reset"))
        stack.pg.restart_immediate()
        first = settled(stack, prefix, "monthly_reset", len(users), 120)
        if len(first) < len(users):
            client.sweep()  # again, as the runbook says: each user renews once per period
        final = settled(stack, prefix, "monthly_reset", len(users), 120)
        mismatches = reconciles(client)
    name = f"renewal sweep, PostgreSQL immediate restart at {before} of {len(users)} users"
    record_background(name, users, first, final, mismatches)


def test_postgres_restarted_mid_grant_expiry_chunk(stack: Stack) -> None:
    """Every user's grant ends; ``grants.expire`` runs its chunk (one transaction) and
    PostgreSQL is restarted while the chunk's statement runs: nothing half-expired, and the next
    run expires each grant once."""
    prefix = f"expire{uuid.uuid4().hex[:6]}"
    users = open_accounts_due(stack, prefix, SWEEP_USERS)
    with stack.engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE grants SET expires_at = now() + interval '1 second'"
                " WHERE user_id LIKE :p AND status = 'active'"
            ),
            {"p": f"{prefix}-%"},
        )
    time.sleep(1.5)
    worker = stack.worker(slug("expiry"), {**stack.env(), **FAST_REDELIVERY})
    with (
        stack.running(worker),
        TokenClient(stack.broker_url, stack.backend_url, timeout=120, retries=0) as client,
    ):
        in_background(client.expire_grants)
        deadline = time.monotonic() + 60
        while not chunk_running(stack):
            assert time.monotonic() < deadline, "the expiry chunk never ran"
            time.sleep(0.01)
        stack.pg.restart_immediate()
        first = entries_per_user(stack, prefix, "expiry")
        client.expire_grants()  # the next run (beat sends it every minute)
        final = settled(stack, prefix, "expiry", len(users), 60)
        mismatches = reconciles(client)
    name = f"grants.expire chunk, PostgreSQL immediate restart while it ran, {len(users)} users"
    record_background(name, users, first, final, mismatches)


def record_background(
    name: str, users: list[str], first: Counter[str], final: Counter[str], mismatches: int
) -> None:
    """A row of the background table; then every user done exactly once, and reconciled."""
    twice = sum(1 for n in final.values() if n > 1)
    SWEEP_LINES.append(f"| {name} | {len(first)} | {len(final)} | {twice} | {mismatches} |")
    assert sorted(final) == sorted(users) and set(final.values()) == {1}
    assert mismatches == 0


def chunk_running(stack: Stack) -> bool:
    """Whether the expiry chunk's statement is running now."""
    return bool(
        stack.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
            " AND query LIKE '%SKIP LOCKED%' AND pid <> pg_backend_pid()"
        )
    )
