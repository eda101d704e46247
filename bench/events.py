"""What events cost a debit, and how long one takes from commit to a Celery consumer.

    python -m bench.events [--seconds 5] [--users 1000] [--runs 5] [--latency-seconds 10]

Cost: the in-process debit (``movements.debit`` through ``statement_scope``, what ``tokens.debit``
runs: one statement in autocommit), one thread, random users and fresh keys, measured with the
events trigger on ledger entries disabled (no outbox), enabled (one ``balance.changed`` per
debit), and enabled on accounts that also have alerts and an auto top-up (the commit-time
decision); interleaved, medians of ``--runs``, with the database backends' CPU time per debit
(read from /proc: the server must run on this machine), which a loaded machine disturbs less
than the rate. The goal: events cost ≤ 10 % of the rate.

Latency: a worker process with ``TOKENS_EVENTS_TASK`` set relays; this process debits at half
the rate it measured without events, from 2 threads, and pops the published task messages from
the Redis events queue as a consumer's worker would take them; latency is the pop's time less
the entry's ``created_at`` (the database's clock under the account lock, just before commit).
Goals: p50 < 50 ms, p99 < 500 ms. Creates and drops its own database.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from bench import summary
from tests.devenv import Scratch, WorkerProcess, producer, running_workers

EVENTS_QUEUE = "bench.events"


def _cpu(pid: int) -> float:
    """CPU seconds process ``pid`` has used (a database backend on this machine)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _for(seconds: float, threads: int, work: Callable[[int, int], None]) -> float:
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def loop(t: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            work(t, i)
            i += 1
        counts[t] = i

    start = time.perf_counter()
    pool = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--latency-seconds", type=int, default=10)
    args = parser.parse_args()
    scratch = Scratch("tokens_bench_events")
    scratch.export()
    scratch.create()
    try:
        _run(args.seconds, args.users, args.runs, args.latency_seconds)
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        scratch.destroy()


def _run(seconds: int, users: int, runs: int, latency_seconds: int) -> None:
    from sqlalchemy import text

    from accounting import accounts, alerts, movements
    from worker.db import get_engine, session_scope, statement_scope
    from worker.migrate import upgrade

    upgrade()
    with session_scope() as s:
        for u in range(users):
            accounts.open_account(s, f"user-{u}", initial_balance=10**12)
            accounts.open_account(s, f"watched-{u}", initial_balance=10**12)
            alerts.set_alerts(s, f"watched-{u}", [10**6, 10**3])
            alerts.set_auto_topup(s, f"watched-{u}", below=100, amount=10**6)
    tag = uuid.uuid4().hex[:6]

    def debit(prefix: str) -> Callable[[int, int], None]:
        def work(t: int, i: int) -> None:
            with statement_scope() as s:
                movements.debit(
                    s, f"{prefix}-{i % users}", 1, "chatgpt_message", idempotency_key=f"{tag}-{i}"
                )

        return work

    def trigger(on: bool) -> None:
        with get_engine().begin() as conn:
            verb = "ENABLE" if on else "DISABLE"
            conn.execute(text(f"ALTER TABLE ledger_entries {verb} TRIGGER tokens_entry_event"))

    def backends() -> list[int]:
        with get_engine().connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                        " AND backend_type = 'client backend'"
                    )
                ).scalars()
            )

    def measured(on: bool, prefix: str) -> Callable[[], tuple[float, float]]:
        """Debits per second, and the database's CPU seconds per debit (its backends')."""

        def run() -> tuple[float, float]:
            nonlocal tag
            tag = uuid.uuid4().hex[:6]
            trigger(on)
            try:
                pids = backends()
                before = sum(_cpu(p) for p in pids)
                started = time.perf_counter()
                rate = _for(seconds, 1, debit(prefix))
                done = rate * (time.perf_counter() - started)
                return rate, (sum(_cpu(p) for p in pids) - before) / done
            finally:
                trigger(True)

        return run

    measured(True, "user")()  # the pool's connection opened and warm
    measures = {
        "no events": measured(False, "user"),
        "events": measured(True, "user"),
        "events + alerts": measured(True, "watched"),
    }
    rates: dict[str, list[float]] = {name: [] for name in measures}
    cpus: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(runs):
        for name, measure in measures.items():
            rate, cpu = measure()
            rates[name].append(rate)
            cpus[name].append(cpu)
    m = {name: statistics.median(r) for name, r in rates.items()}
    c = {name: statistics.median(r) for name, r in cpus.items()}
    print(f"{seconds}s each, median of {runs} interleaved runs, {users} users per kind")
    for name, rate in m.items():
        cost = 1 - rate / m["no events"]
        low, high = min(rates[name]), max(rates[name])
        print(
            f"  in-process debit, {name:16} {rate:7.0f}/s  cost {cost:6.1%}  ({low:.0f}-{high:.0f})"
            f"  database CPU {c[name] * 1e6:5.0f} µs/debit"
            f" (+{(c[name] - c['no events']) * 1e6:.0f})"
        )
    cost = 1 - m["events"] / m["no events"]
    summary.record(
        goal="events' cost on an in-process debit",
        figure=f"{m['events']:.0f}/s",
        baseline=f"{m['no events']:.0f}/s without events",
        ratio=m["events"] / m["no events"],
        target="≥ 0.90",
        met=cost <= 0.10,
        command="python -m bench.events",
    )
    _latency(m["no events"] / 2, latency_seconds, users, debit)


def _caught_up(timeout: float = 300) -> None:
    from accounting import outbox
    from worker.db import session_scope

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as s:
            if outbox.backlog(s, celery=True, webhook=False).pending == 0:
                return
        time.sleep(0.2)
    raise SystemExit("the relay did not catch up")


def _latency(
    rate: float, seconds: int, users: int, debit: Callable[[str], Callable[[int, int], None]]
) -> None:
    import redis

    from worker.settings import get_settings

    client = redis.Redis.from_url(get_settings().broker)
    client.delete(EVENTS_QUEUE)
    relay = WorkerProcess(
        f"bench-relay-{os.getpid()}",
        concurrency=1,
        queues=f"idle-{uuid.uuid4().hex[:8]}",
        env={"TOKENS_EVENTS_TASK": "producer.on_event", "TOKENS_EVENTS_QUEUE": EVENTS_QUEUE},
    )
    latencies: list[float] = []
    done = threading.Event()

    def consume() -> None:
        while not done.is_set() or client.llen(EVENTS_QUEUE):
            popped = client.brpop([EVENTS_QUEUE], timeout=1)
            if popped is None:
                continue
            now = time.time()
            envelope = json.loads(popped[1])
            _args, kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            if (
                kwargs["type"] == "balance.changed"
                and kwargs["data"]["operation_type"] != "adjustment"
            ):
                latencies.append(now - datetime.fromisoformat(kwargs["at"]).timestamp())

    with running_workers(producer(), relay):
        _caught_up()  # what the accounts' opening and the cost runs wrote: not measured
        client.delete(EVENTS_QUEUE)
        consumer = threading.Thread(target=consume)
        consumer.start()
        work = debit("user")
        interval = 2 / rate  # two threads

        def paced(t: int, i: int) -> None:
            started = time.perf_counter()
            work(t, i + t * 10**9)
            left = interval - (time.perf_counter() - started)
            if left > 0:
                time.sleep(left)

        achieved = _for(seconds, 2, paced)
        time.sleep(2)
        done.set()
        consumer.join(30)
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    print(
        f"commit -> Celery consumer at {achieved:.0f} debits/s (half of {rate * 2:.0f}/s):"
        f" {len(latencies)} events, p50 {p50:.1f} ms, p99 {p99:.1f} ms,"
        f" max {latencies[-1] * 1000:.1f} ms"
    )
    summary.record(
        goal="event latency, commit to a Celery consumer (p50 / p99)",
        figure=f"{p50:.0f} / {p99:.0f} ms",
        baseline=f"at {achieved:.0f} debits/s",
        ratio=None,
        target="< 50 / < 500 ms",
        met=p50 < 50 and p99 < 500,
        command="python -m bench.events",
    )


if __name__ == "__main__":
    main()
