"""Pools and spend limits (issue 22): a member's debit against a plain one, in the same run.

    python -m bench.pool_debit [--seconds 5] [--members 64] [--hot-clients 16] [--runs 3]
                               [--tasks 1000]

Measures, each for ``--seconds`` and ``--runs`` times interleaved (medians printed), every debit
``movements.debit`` through ``worker.db.statement_scope`` (the statement alone, what
``tokens.debit`` runs), fresh keys:

- one thread: plain accounts (no pool, no limit) at random, the baseline;
- one thread: members of one 3-level tree (pool -> 4 teams -> members) at random, with two
  limits on each level (member: a calendar day and a rolling minute; team: a calendar hour and
  a rolling day; pool: a calendar month and a rolling 30 days), never reached;
- ``--hot-clients`` threads on one hot plain account, the baseline of the next;
- ``--hot-clients`` threads, each a different member of that limited tree (one hot pool);
- end to end (``--tasks`` > 0): ``tokens.debit`` round trips through one worker (concurrency 2),
  sent all at once and awaited, to plain accounts and to members, interleaved rounds.

Creates and drops its own database.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
import uuid
from collections.abc import Callable

from bench import summary
from bench.domain_debit import _for
from tests.devenv import Scratch

BIG = 10**12
CHAT = "chatgpt_message"
LIMITS = {
    "member": (("daily", "day", False), ("burst", "minute", True)),
    "team": (("hourly", "hour", False), ("day", "day", True)),
    "pool": (("monthly", "month", False), ("30d", "month", True)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--hot-clients", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=1000)
    args = parser.parse_args()

    scratch = Scratch("tokens_bench_pool")
    scratch.export()
    os.environ["TOKENS_DB_POOL_SIZE"] = str(args.hot_clients + 2)
    scratch.create()
    try:
        _run(args.seconds, args.members, args.hot_clients, args.runs, args.tasks)
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        scratch.destroy()


def _run(seconds: int, members: int, hot_clients: int, runs: int, tasks: int) -> None:
    from accounting import accounts, limits, movements
    from worker.db import session_scope, statement_scope
    from worker.migrate import upgrade

    upgrade()
    names = [f"m{i}" for i in range(members)]
    with session_scope() as s:
        for i in range(members):
            accounts.open_account(s, f"plain-{i}", initial_balance=BIG)
        accounts.open_account(s, "hot", initial_balance=BIG)
        accounts.open_account(s, "pool", initial_balance=BIG)
        for t in range(4):
            accounts.open_account(s, f"team-{t}", parent_id="pool")
        for i, name in enumerate(names):
            accounts.open_account(s, name, parent_id=f"team-{i % 4}")
        for level, who in (("pool", ["pool"]), ("team", [f"team-{t}" for t in range(4)])):
            for user in who:
                for name, period, rolling in LIMITS[level]:
                    limits.set_limit(s, user, name, BIG, period, rolling)
        for user in names:
            for name, period, rolling in LIMITS["member"]:
                limits.set_limit(s, user, name, BIG, period, rolling)
    tag = uuid.uuid4().hex[:6]

    def debit(user: Callable[[int, int], str]) -> Callable[[int, int], None]:
        def work(t: int, i: int) -> None:
            with statement_scope() as s:
                movements.debit(
                    s, user(t, i), 1, "chatgpt_message", idempotency_key=f"{tag}{t}-{i}"
                )

        return work

    pick = random.Random(7)
    measures: dict[str, Callable[[], float]] = {
        "plain": lambda: _for(seconds, 1, debit(lambda t, i: f"plain-{pick.randrange(members)}")),
        "member": lambda: _for(seconds, 1, debit(lambda t, i: pick.choice(names))),
        "hot": lambda: _for(seconds, hot_clients, debit(lambda t, i: "hot")),
        "hot_pool": lambda: _for(seconds, hot_clients, debit(lambda t, i: names[t])),
    }
    rates: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(runs):
        for name, measure in measures.items():
            tag = uuid.uuid4().hex[:6]
            rates[name].append(measure())
    if tasks:
        rates |= _end_to_end(tasks, members, names, runs)
    m = {name: statistics.median(r) for name, r in rates.items()}

    with session_scope() as s:
        from accounting.ledger import reconcile

        assert reconcile(s).mismatches == [], "balance differs from ledger after the benchmark"
        used = limits.limits(s, names[0]).limits
        assert all(x.used <= x.max_tokens for x in used)

    print(f"{seconds}s each, median of {runs} interleaved runs, {members} members, 6 limits each")
    print(f"{'measure':60} {'rate':>9} {'ratio':>7}   (runs' min-max)")
    rows = [
        ("plain debit, one thread (baseline)", "plain", "plain"),
        ("member debit, 3 levels, 2 limits per level, one thread", "member", "plain"),
        (f"one hot account, {hot_clients} threads (baseline)", "hot", "hot"),
        (f"one hot pool, {hot_clients} members at once, 6 limits each", "hot_pool", "hot"),
    ]
    if tasks:
        rows += [
            (f"tokens.debit through a worker, {tasks} plain (baseline)", "e2e_plain", "e2e_plain"),
            (f"tokens.debit through a worker, {tasks} members", "e2e_member", "e2e_plain"),
        ]
    for label, name, base in rows:
        low, high = min(rates[name]), max(rates[name])
        print(f"{label:60} {m[name]:8.0f}/s {m[name] / m[base]:7.2f}   ({low:.0f}-{high:.0f})")
    member = m["member"] / m["plain"]
    summary.record(
        "member debit through 3 levels, 2 limits each (statement alone) vs plain debit",
        f"{m['member']:.0f}/s",
        f"plain {m['plain']:.0f}/s",
        member,
        ">= 0.7",
        member >= 0.7,
    )
    if tasks:
        e2e = m["e2e_member"] / m["e2e_plain"]
        summary.record(
            "member debit through 3 levels, 2 limits each, end to end vs plain",
            f"{m['e2e_member']:.0f}/s",
            f"plain {m['e2e_plain']:.0f}/s",
            e2e,
            ">= 0.9",
            e2e >= 0.9,
        )
    hot = m["hot_pool"] / m["hot"]
    summary.record(
        f"hot pool, {hot_clients} members at once vs one hot account",
        f"{m['hot_pool']:.0f}/s",
        f"hot account {m['hot']:.0f}/s",
        hot,
        ">= 0.5",
        hot >= 0.5,
    )


def _end_to_end(tasks: int, members: int, names: list[str], runs: int) -> dict[str, list[float]]:
    """Debits per second through one worker: ``tasks`` sent at once, then every result."""
    from tests.devenv import WorkerProcess, producer, running_workers

    app = producer()
    rates: dict[str, list[float]] = {"e2e_plain": [], "e2e_member": []}
    users = {"e2e_plain": [f"plain-{i}" for i in range(members)], "e2e_member": names}

    def send(who: list[str], n: int) -> float:
        start = time.perf_counter()
        sent = [
            app.send_task(
                "tokens.debit",
                kwargs={
                    "user_id": who[i % len(who)],
                    "amount": 1,
                    "operation_type": "chatgpt_message",
                },
            )
            for i in range(n)
        ]
        outcomes = [r.get(timeout=300) for r in sent]
        assert all(o["success"] for o in outcomes), next(o for o in outcomes if not o["success"])
        return n / (time.perf_counter() - start)

    with running_workers(app, WorkerProcess("bench-pools", concurrency=2, loglevel="WARNING")):
        send(users["e2e_plain"], 50)  # warm up
        for _ in range(runs):
            for name, who in users.items():
                rates[name].append(send(who, tasks))
    return rates


if __name__ == "__main__":
    main()
