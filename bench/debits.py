"""Debits per second through the worker, against baselines measured in the same run.

    python -m bench.debits [--tasks 2000] [--concurrency 2] [--users 100]

``tokens.debit_batch`` sends the same number of debits as batches of 100 (one message, one
commit per batch); its rate counts debits, not messages. Baselines: ``health.ping`` (a task that
does one ``SELECT 1``: the transport and task overhead) through the same worker, and the domain
``debit`` called in-process with no Celery (the database path alone). Creates and drops its own
database and Redis pair.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from bench import summary
from tests.devenv import Scratch, WorkerProcess, producer, running_workers


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:8.0f}/s"


def _round_trips(app: Any, name: str, kwargs: Callable[[int], dict[str, Any]], n: int) -> float:
    """Send ``n`` tasks, then wait for every result; returns the elapsed seconds."""
    start = time.perf_counter()
    results = [app.send_task(name, kwargs=kwargs(i)) for i in range(n)]
    outcomes = [r.get(timeout=300) for r in results]
    elapsed = time.perf_counter() - start
    failed = [o for o in outcomes if not o.get("success") or o.get("refused")]
    if failed:
        raise SystemExit(f"{name}: {len(failed)} failures, e.g. {failed[0]}")
    return elapsed


BATCH = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--users", type=int, default=100)
    args = parser.parse_args()

    scratch = Scratch("tokens_bench")
    scratch.export()
    scratch.create()
    try:
        _run(args.tasks, args.concurrency, args.users)
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        scratch.destroy()


def _run(n: int, concurrency: int, users: int) -> None:
    from accounting import accounts, movements
    from worker.db import session_scope
    from worker.migrate import upgrade

    upgrade()
    with session_scope() as s:
        for u in range(users):
            accounts.open_account(s, f"user-{u}", initial_balance=10**9)

    # In-process domain debits, no Celery: the database path alone.
    start = time.perf_counter()
    for i in range(n):
        with session_scope() as s:
            movements.debit(s, f"user-{i % users}", 1, "chatgpt_message", idempotency_key=f"d{i}")
    direct = time.perf_counter() - start

    app = producer()
    worker = WorkerProcess("bench", concurrency=concurrency, loglevel="WARNING")
    with running_workers(app, worker):
        _round_trips(app, "health.ping", lambda i: {}, 50)  # warm up
        ping = _round_trips(app, "health.ping", lambda i: {}, n)
        spread = _round_trips(
            app,
            "tokens.debit",
            lambda i: {
                "user_id": f"user-{i % users}",
                "amount": 1,
                "operation_type": "chatgpt_message",
            },
            n,
        )
        hot = _round_trips(
            app,
            "tokens.debit",
            lambda i: {"user_id": "user-0", "amount": 1, "operation_type": "chatgpt_message"},
            n,
        )
        batched = _round_trips(
            app,
            "tokens.debit_batch",
            lambda b: {
                "debits": [
                    {
                        "user_id": f"user-{i % users}",
                        "amount": 1,
                        "operation_type": "chatgpt_message",
                    }
                    for i in range(b * BATCH, min(n, (b + 1) * BATCH))
                ]
            },
            -(-n // BATCH),
        )

    with session_scope() as s:
        from accounting.ledger import reconcile

        assert reconcile(s).mismatches == [], "balance differs from ledger after the benchmark"

    print(f"{n} tasks (or debits) each, worker concurrency {concurrency}, {users} users")
    print(f"{'measure':44} {'rate':>10} {'vs ping':>8}")
    rows = [
        ("health.ping round trip (transport baseline)", ping),
        (f"tokens.debit round trip, {users} users", spread),
        ("tokens.debit round trip, one hot account", hot),
        (f"tokens.debit_batch of {BATCH}, debits/s", batched),
        ("domain debit in-process, no Celery (1 thread)", direct),
    ]
    for label, seconds in rows:
        print(f"{label:44} {_rate(n, seconds):>10} {ping / seconds:8.2f}")
    for label, seconds in rows[1:3]:
        summary.record(
            f"{label} vs health.ping",
            f"{n / seconds:.0f}/s",
            f"ping {n / ping:.0f}/s",
            ping / seconds,
            "(no goal)",
            None,
        )


if __name__ == "__main__":
    main()
