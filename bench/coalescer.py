"""The single-debit coalescer against single ``tokens.debit`` messages at the same load
(issue 12's goal: at least 1.2x).

    python -m bench.coalescer [--debits 2000] [--producers 4] [--concurrency 2] [--rounds 3]

One worker (prefork, ``--concurrency`` processes) with ``TOKENS_COALESCE_MS`` set, so the same
worker serves both: single debits sent to the default queue run as tasks in its pool; the same
debits sent to the queue ``tokens.debit`` are collected by its coalescer. Each measure: the
producer threads send ``--debits`` debits over 100 users as fast as they can, then wait for
every result; the rate is debits over the time until the last result. Rounds alternate the
order; rates are medians. Creates and drops its own database and Redis pair.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from typing import Any

from bench import summary
from tests.devenv import Scratch, WorkerProcess, producer, running_workers

USERS = 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--debits", type=int, default=2000)
    parser.add_argument("--producers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--coalesce-ms", type=int, default=5)
    args = parser.parse_args()

    scratch = Scratch("tokens_bench_coalescer")
    scratch.export()
    scratch.create()
    try:
        _run(args)
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        scratch.destroy()


def _send(app: Any, n: int, producers: int, queue: str | None) -> float:
    """``n`` debits from ``producers`` threads, then every result; returns the seconds."""
    results: list[list[Any]] = [[] for _ in range(producers)]

    def produce(p: int) -> None:
        for i in range(p, n, producers):
            kwargs = {
                "user_id": f"user-{i % USERS}",
                "amount": 1,
                "operation_type": "chatgpt_message",
            }
            options = {"queue": queue} if queue else {}
            results[p].append(app.send_task("tokens.debit", kwargs=kwargs, **options))

    start = time.perf_counter()
    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    outcomes = [r.get(timeout=300) for per in results for r in per]
    elapsed = time.perf_counter() - start
    failed = [o for o in outcomes if not o.get("success")]
    if failed:
        raise SystemExit(f"{len(failed)} failures, e.g. {failed[0]}")
    return elapsed


def _run(args: argparse.Namespace) -> None:
    from accounting import accounts
    from accounting.ledger import reconcile
    from worker.coalescer import QUEUE
    from worker.db import session_scope
    from worker.migrate import upgrade

    upgrade()
    with session_scope() as s:
        for u in range(USERS):
            accounts.open_account(s, f"user-{u}", initial_balance=10**9)

    app = producer()
    env = {"TOKENS_COALESCE_MS": str(args.coalesce_ms)}
    worker = WorkerProcess(
        "bench-coalescer", concurrency=args.concurrency, env=env, loglevel="WARNING"
    )
    seconds: dict[str, list[float]] = {"single": [], "coalesced": []}
    with running_workers(app, worker):
        _send(app, 200, args.producers, None)  # warm up both paths
        _send(app, 200, args.producers, QUEUE)
        for r in range(args.rounds):
            order = ("single", "coalesced") if r % 2 == 0 else ("coalesced", "single")
            for what in order:
                queue = QUEUE if what == "coalesced" else None
                seconds[what].append(_send(app, args.debits, args.producers, queue))

    with session_scope() as s:
        assert reconcile(s).mismatches == [], "balance differs from ledger after the benchmark"

    rate = {k: args.debits / statistics.median(v) for k, v in seconds.items()}
    print(
        f"{args.debits} debits per measure, {args.producers} producer threads, worker concurrency "
        f"{args.concurrency}, coalesce {args.coalesce_ms} ms, {args.rounds} rounds, "
        f"load {os.getloadavg()[0]:.1f}"
    )
    print(f"{'measure':52} {'debits/s':>9}   rounds")
    labels = {
        "single": "tokens.debit, single messages (pool)",
        "coalesced": "tokens.debit, coalesced (queue tokens.debit)",
    }
    for k, label in labels.items():
        each = " ".join(f"{args.debits / t:6.0f}" for t in seconds[k])
        print(f"{label:52} {rate[k]:9.0f}   {each}")
    print(f"coalesced / single: {rate['coalesced'] / rate['single']:.2f}x (goal >= 1.20x)")
    ratio = rate["coalesced"] / rate["single"]
    summary.record(
        "coalesced single debits vs single tokens.debit messages",
        f"{rate['coalesced']:.0f}/s",
        f"single {rate['single']:.0f}/s",
        ratio,
        ">= 1.2x",
        ratio >= 1.2,
    )


if __name__ == "__main__":
    main()
