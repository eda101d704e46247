"""Pools and spend limits (issue 22): a member's debit against a plain one, in the same run.

    python -m bench.pool_debit [--seconds 5] [--slice 0.5] [--members 64] [--hot-clients 16]
                               [--runs 3] [--tasks 1000] [--round 200]

Measures, every debit ``movements.debit`` through ``worker.db.statement_scope`` (the statement
alone, what ``tokens.debit`` runs), fresh keys, each against its baseline:

- one thread: members of one 3-level tree (pool -> 4 teams -> members) at random, with two
  limits on each level (member: a calendar day and a rolling minute; team: a calendar hour and
  a rolling day; pool: a calendar month and a rolling 30 days), never reached; against plain
  accounts (no pool, no limit) at random;
- ``--hot-clients`` threads, each a different member of that limited tree (one hot pool);
  against as many threads on one hot plain account;
- end to end (``--tasks`` > 0): ``tokens.debit`` round trips through one worker (concurrency 2),
  in rounds of ``--round`` tasks sent at once and awaited, to members against plain accounts.

The machine is shared (other runs come and go), so a measure and its baseline never run far
apart, and the figure is a ratio of the two measured at the same moments. In each of
``--runs`` runs, each gets ``--seconds``: the one thread alternates plain and member calls,
each timed; the threads alternate slices of ``--slice`` seconds with their baseline's, and the
end-to-end rounds alternate likewise (``--tasks`` of each), the baseline first in every other
pair. Printed: each rate as the mean over the slices (or rounds), so the ratio is the measure's
debits over its baseline's at the same moments; then its spread: the lowest and highest of the
runs' ratios (what to trust) and the 10th to 90th percentile of the slices' (short, noisy).

Creates and drops its own database.
"""

from __future__ import annotations

import argparse
import itertools
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
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--slice", type=float, default=0.5)
    parser.add_argument("--members", type=int, default=64)
    parser.add_argument("--hot-clients", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--round", type=int, default=200)
    args = parser.parse_args()

    scratch = Scratch("tokens_bench_pool")
    scratch.export()
    os.environ["TOKENS_DB_POOL_SIZE"] = str(args.hot_clients + 2)
    scratch.create()
    try:
        _run(
            args.seconds,
            args.slice,
            args.members,
            args.hot_clients,
            args.runs,
            args.tasks,
            args.round,
        )
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        scratch.destroy()


class Pairs:
    """A measure against its baseline, in pairs of slices of equal length: both rates, slice by
    slice, run by run. The ratio of a run (or of them all) is the measure's debits over the
    baseline's in the same slices: their mean rates' ratio."""

    def __init__(self) -> None:
        self.runs: list[list[tuple[float, float]]] = []

    def add_run(self, pairs: list[tuple[float, float]]) -> None:
        self.runs.append(pairs)

    @property
    def pairs(self) -> list[tuple[float, float]]:
        return [p for run in self.runs for p in run]

    @property
    def base(self) -> float:
        return statistics.fmean(b for b, _ in self.pairs)

    @property
    def rate(self) -> float:
        return statistics.fmean(r for _, r in self.pairs)

    @property
    def ratio(self) -> float:
        return self.rate / self.base

    def spread(self) -> str:
        """The runs' ratios, low to high; the 10th to 90th percentile of the slices' ratios."""
        per_run = [sum(r for _, r in run) / sum(b for b, _ in run) for run in self.runs]
        ratios = [r / b for b, r in self.pairs]
        deciles = statistics.quantiles(ratios, n=10) if len(ratios) > 1 else ratios * 9
        return f"{min(per_run):.2f}-{max(per_run):.2f}   {deciles[0]:.2f}-{deciles[-1]:.2f}"


def _paired(
    seconds: float,
    slice_s: float,
    threads: int,
    base: Callable[[int, int], None],
    work: Callable[[int, int], None],
) -> list[tuple[float, float]]:
    """(baseline, measure) rates in alternating slices of ``slice_s``, ``seconds`` of each in
    all: the baseline first in even pairs, last in odd ones, so that a load coming or going
    weighs on both alike."""
    pairs = []
    for k in range(max(1, round(seconds / slice_s))):
        if k % 2 == 0:
            b = _for(slice_s, threads, base)
            pairs.append((b, _for(slice_s, threads, work)))
        else:
            r = _for(slice_s, threads, work)
            pairs.append((_for(slice_s, threads, base), r))
    return pairs


def _alternating(
    seconds: float,
    slice_s: float,
    base: Callable[[int, int], None],
    work: Callable[[int, int], None],
) -> list[tuple[float, float]]:
    """(baseline, measure) rates of one thread whose calls alternate (the baseline first in
    every other pair of calls), each call timed: the rate of each is its calls over the time
    they took, summed over slices of ``slice_s`` (both within each), ``2 * seconds`` in all.
    A load that comes and goes weighs on both alike, to the call."""
    pairs = []
    i = 0
    for _ in range(max(1, round(2 * seconds / slice_s))):
        spent, calls = [0.0, 0.0], [0, 0]
        stop = time.perf_counter() + slice_s
        while time.perf_counter() < stop:
            for side in (0, 1) if i % 2 == 0 else (1, 0):
                start = time.perf_counter()
                (base, work)[side](0, i)
                spent[side] += time.perf_counter() - start
                calls[side] += 1
            i += 1
        pairs.append((calls[0] / spent[0], calls[1] / spent[1]))
    return pairs


def _run(
    seconds: float,
    slice_s: float,
    members: int,
    hot_clients: int,
    runs: int,
    tasks: int,
    round_tasks: int,
) -> None:
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
    keys = itertools.count()  # next() is atomic under the GIL: a fresh key in every thread

    def debit(user: Callable[[int, int], str]) -> Callable[[int, int], None]:
        def work(t: int, i: int) -> None:
            with statement_scope() as s:
                movements.debit(
                    s, user(t, i), 1, "chatgpt_message", idempotency_key=f"{tag}-{next(keys)}"
                )

        return work

    pick = random.Random(7)
    plain = debit(lambda t, i: f"plain-{pick.randrange(members)}")
    member = debit(lambda t, i: pick.choice(names))
    hot = debit(lambda t, i: "hot")
    hot_pool = debit(lambda t, i: names[t])
    results = {"member": Pairs(), "hot_pool": Pairs()}
    _for(slice_s, 1, plain)  # warm up: connections, plans
    _for(slice_s, hot_clients, hot_pool)
    for _ in range(runs):
        results["member"].add_run(_alternating(seconds, slice_s, plain, member))
        results["hot_pool"].add_run(_paired(seconds, slice_s, hot_clients, hot, hot_pool))
    if tasks:
        results["e2e_member"] = _end_to_end(tasks, round_tasks, members, names, runs)

    with session_scope() as s:
        from accounting.ledger import reconcile

        assert reconcile(s).mismatches == [], "balance differs from ledger after the benchmark"
        used = limits.limits(s, names[0]).limits
        assert all(x.used <= x.max_tokens for x in used)

    print(
        f"{seconds:g}s of each measure per run, alternating with its baseline (one thread: call"
        f" by call; threads: in {slice_s:g}s slices; end to end: in rounds of {round_tasks}),"
        f" {runs} runs, {members} members, 6 limits each; ratio: the measure's debits over its"
        " baseline's at the same moments"
    )
    print(f"{'measure':60} {'rate':>9} {'ratio':>6}   runs' ratios   slices' p10-p90")
    rows = [
        ("plain debit, one thread (baseline)", "member", None),
        ("member debit, 3 levels, 2 limits per level, one thread", "member", "member"),
        (f"one hot account, {hot_clients} threads (baseline)", "hot_pool", None),
        (f"one hot pool, {hot_clients} members at once, 6 limits each", "hot_pool", "hot_pool"),
    ]
    if tasks:
        rows += [
            ("tokens.debit through a worker, plain accounts (baseline)", "e2e_member", None),
            ("tokens.debit through a worker, members", "e2e_member", "e2e_member"),
        ]
    for label, name, measured in rows:
        r = results[name]
        if measured is None:
            print(f"{label:60} {r.base:8.0f}/s {1:6.2f}")
        else:
            print(f"{label:60} {r.rate:8.0f}/s {r.ratio:6.2f}   {r.spread()}")
    m = results["member"]
    summary.record(
        "member debit through 3 levels, 2 limits each (statement alone) vs plain debit",
        f"{m.rate:.0f}/s",
        f"plain {m.base:.0f}/s",
        m.ratio,
        ">= 0.7",
        m.ratio >= 0.7,
    )
    if tasks:
        e = results["e2e_member"]
        summary.record(
            "member debit through 3 levels, 2 limits each, end to end vs plain",
            f"{e.rate:.0f}/s",
            f"plain {e.base:.0f}/s",
            e.ratio,
            ">= 0.9",
            e.ratio >= 0.9,
        )
    h = results["hot_pool"]
    summary.record(
        f"hot pool, {hot_clients} members at once vs one hot account",
        f"{h.rate:.0f}/s",
        f"hot account {h.base:.0f}/s",
        h.ratio,
        ">= 0.5",
        h.ratio >= 0.5,
    )


def _end_to_end(tasks: int, round_tasks: int, members: int, names: list[str], runs: int) -> Pairs:
    """Debits per second through one worker, in rounds of ``round_tasks`` sent at once, then
    every result awaited: in each run, ``tasks`` to members and as many to plain accounts, in
    pairs of rounds (the plain round first in every other pair)."""
    from tests.devenv import WorkerProcess, producer, running_workers

    app = producer()
    plain = [f"plain-{i}" for i in range(members)]

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

    result = Pairs()
    with running_workers(app, WorkerProcess("bench-pools", concurrency=2, loglevel="WARNING")):
        send(plain, 50)  # warm up
        send(names, 50)
        for _ in range(runs):
            pairs = []
            for k in range(max(1, tasks // round_tasks)):
                if k % 2 == 0:
                    b = send(plain, round_tasks)
                    pairs.append((b, send(names, round_tasks)))
                else:
                    r = send(names, round_tasks)
                    pairs.append((send(plain, round_tasks), r))
            result.add_run(pairs)
    return result


if __name__ == "__main__":
    main()
