"""Faults injected while producers send debits through the typed client, on a private stack
(tests/faults/stack.py): what each must keep (issue 25).

- every debit whose send the client reported done (a result came back) is applied exactly once;
- every debit the broker acknowledged is applied, without the client retrying it (nothing the
  broker acknowledged is lost);
- every debit whose send failed is applied at most once, and once when sent again with its key;
- the client's retries with the same key never apply twice; the ledger reconciles.

The short form (1,000 debits a fault) runs with the rest of the suite; ``make faults``
(``TOKENS_TEST_FAULTS=full``) sends 5,000 a fault and prints the table (tests/faults/conftest.py).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.faults.load import Load, Report, during
from tests.faults.stack import FAST_REDELIVERY, Stack
from tests.servers import PrivateRabbit
from tests.worker.tcp_proxy import TcpProxy

pytestmark = pytest.mark.faults

FULL = os.environ.get("TOKENS_TEST_FAULTS") == "full"
DEBITS = 5000 if FULL else 1000
#: When the fault starts: after this share of the debits was sent.
AT = 0.3
#: How long a link stays cut.
CUT_SECONDS = 10.0 if FULL else 5.0
REPORTS: list[Report] = []


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
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


@pytest.mark.parametrize("fsync", ["always", "everysec"])
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


@pytest.mark.parametrize("how", ["cut", "drop"])
def test_worker_to_postgres_link(stack: Stack, how: str) -> None:
    """``drop``: a statement in flight waits on a connection nothing answers; the soft time
    limit (10 s here) ends it, the task fails, the producer is told."""
    proxy = stack.proxy_to_postgres()
    env = {**stack.env(proxy), **FAST_REDELIVERY}
    name = f"worker-PostgreSQL link {how} {CUT_SECONDS:g} s"
    check(run(stack, name, cut_for(proxy, how), env))


@pytest.mark.parametrize("how", ["cut", "drop"])
def test_worker_to_broker_link(stack: Stack, how: str) -> None:
    """``drop``: before the broker transport's socket timeout (worker/config.py), the worker's
    loop waited on an acknowledgement nothing would answer, for good."""
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


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_rabbitmq_killed_and_restarted(stack: Stack, queue_type: str) -> None:
    """A RabbitMQ node of the test's own (results stay in the stack's Redis), SIGKILLed and
    started again; producers publish with confirms, so a publish that returned is on disk."""
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
