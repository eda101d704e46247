"""``tokens.debit`` against a Celery no-op task through the same worker, and debit latency.

    python -m bench.transport [--tasks 1000] [--rounds 3] [--users 100] [--concurrency 2]
                              [--variant NAME:VAR=VALUE,VAR=VALUE ...] [--no-latency]

Throughput: one producer sends ``--tasks`` messages and then collects every result, for
``health.noop`` (no validation, no database: the transport alone, routed like a debit, with the
debit's kwargs so the messages weigh the same) and for ``tokens.debit``, on one worker (same
broker, backend, pool, concurrency and prefetch). Worker CPU per task is the CPU time of the
worker's processes (main and pool, read from /proc) over the run, divided by the tasks; a
breakdown of the machine's time per task (the worker, PostgreSQL, Redis, this producer, idle
cores) shows where a debit's extra over the no-op goes. A third task, ``bench.wait``
(bench/waiting.py, loaded by this benchmark's worker only), is the no-op after a sleep as long as
a debit waits for its statement (measured in-process first): the share of the gap a wait alone
makes on this transport. Each
variant (``--variant``: TOKENS_* variables given to the worker; the first variant is the settings
as they are, named ``default``) gets a fresh worker per round, the variants interleaved round by
round, each round starting with the next variant; medians of the rounds are printed, with the
ratios the issue sets goals for: debit rate ≥ 0.7 of the no-op's, debit CPU ≤ 1.5x the no-op's.
Then the pool pre-ping's own cost: a unit of work (checkout, one statement, commit) in this
process with the ping on and off.

Latency (the default variant): one debit round trip, send to result published in the backend
(seen by a subscriber in the producer process), with one request outstanding, then with a paced
producer at half of the default variant's median debit rate, measured from each message's
scheduled send time (a producer falling behind counts against the latency; its garbage collector
is paused meanwhile, so that what is timed is the round trip, not the benchmark's own heap).
Goal: p99 at half load ≤ 3x its p50. Creates and drops its own database and Redis pair.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from celery import Celery

from bench import summary
from tests.devenv import Scratch, WorkerProcess, producer, running_workers

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
NOOP, DEBIT = "health.noop", "tokens.debit"
# bench/waiting.py's task (imported by the worker with -I; importing it here would build the app
# before the scratch settings are exported).
WAIT = "bench.wait"
TASKS = (NOOP, WAIT, DEBIT)


def process_cpu_seconds(worker_pgid: int) -> dict[str, float]:
    """User + system CPU seconds of the live processes, from one pass over /proc: those in the
    worker's process group, those named ``postgres*`` (the server and its backends) and those
    named ``redis-server*``."""
    ticks = {"worker": 0, "postgres": 0, "redis": 0}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, rest = stat.read_text().split("(", 1)[1].rsplit(")", 1)
        except OSError:
            continue
        # After the command: state ppid pgrp session ... utime (14th field) stime (15th)
        fields = rest.split()
        spent = int(fields[11]) + int(fields[12])
        if int(fields[2]) == worker_pgid:
            ticks["worker"] += spent
        elif comm.startswith("postgres"):
            ticks["postgres"] += spent
        elif comm.startswith("redis-server"):
            ticks["redis"] += spent
    return {part: t / CLOCK_TICKS for part, t in ticks.items()}


def idle_seconds() -> float:
    """Idle and I/O-wait seconds of all cores together, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / CLOCK_TICKS


# Where the machine's time goes while tasks run (the Breakdown columns).
PARTS = ("worker", "postgres", "redis", "producer", "idle")


def machine_seconds(worker_pgid: int) -> dict[str, float]:
    return {
        **process_cpu_seconds(worker_pgid),
        "producer": time.process_time(),
        "idle": idle_seconds(),
    }


@dataclass
class Variant:
    name: str
    env: dict[str, str]
    rates: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in TASKS})
    # Per task name, per part of PARTS: the seconds per task of each round.
    parts: dict[str, dict[str, list[float]]] = field(
        default_factory=lambda: {k: {p: [] for p in PARTS} for k in TASKS}
    )

    def cpu_ms(self, task: str) -> float:
        """The worker's CPU per ``task`` (main and pool processes), ms, median of the rounds."""
        return statistics.median(self.parts[task]["worker"]) * 1000


def parse_variant(text: str) -> Variant:
    name, _, assignments = text.partition(":")
    env = dict(a.split("=", 1) for a in assignments.split(",") if a)
    return Variant(name, env)


def debit_kwargs(users: int) -> Callable[[int], dict[str, Any]]:
    return lambda i: {
        "user_id": f"user-{i % users}",
        "amount": 1,
        "operation_type": "chatgpt_message",
    }


def round_trips(app: Celery, name: str, kwargs: Callable[[int], dict[str, Any]], n: int) -> float:
    """Send ``n`` tasks, then wait for every result; returns the elapsed seconds."""
    start = time.perf_counter()
    results = [app.send_task(name, kwargs=kwargs(i)) for i in range(n)]
    outcomes = [r.get(timeout=300) for r in results]
    elapsed = time.perf_counter() - start
    failed = [o for o in outcomes if not o.get("success")]
    if failed:
        raise SystemExit(f"{name}: {len(failed)} failures, e.g. {failed[0]}")
    return elapsed


def statement_wait(users: int, n: int = 300) -> float:
    """Seconds a debit waits for its statement (its wall time less its CPU), in this process."""
    from accounting import movements
    from worker.db import statement_scope

    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        with statement_scope() as session:
            movements.debit(session, f"user-{i % users}", 1, "chatgpt_message")
    waited = (time.perf_counter() - wall) - (time.process_time() - cpu)
    return max(waited / n, 0.0)


def measure(
    app: Celery, variant: Variant, n: int, users: int, concurrency: int, wait: float
) -> None:
    worker = WorkerProcess(
        f"transport-{variant.name}",
        concurrency=concurrency,
        env=variant.env,
        loglevel="WARNING",
        include="bench.waiting",
    )
    kwargs = {NOOP: debit_kwargs(users), WAIT: lambda _i: {"seconds": wait}}
    kwargs[DEBIT] = kwargs[NOOP]
    with running_workers(app, worker):
        assert worker.proc is not None
        for name in TASKS:  # warm up: connections, imports, pool processes
            round_trips(app, name, kwargs[name], 50)
        for name in TASKS:
            before = machine_seconds(worker.proc.pid)
            seconds = round_trips(app, name, kwargs[name], n)
            after = machine_seconds(worker.proc.pid)
            variant.rates[name].append(n / seconds)
            for part in PARTS:
                variant.parts[name][part].append((after[part] - before[part]) / n)


class Arrivals:
    """When each task's result is published by the Redis backend, as a producer would learn it."""

    PREFIX = "celery-task-meta-"

    def __init__(self, backend_url: str) -> None:
        # Kept: a client that is garbage-collected closes its pool, the subscription's included.
        self.client = redis.Redis.from_url(backend_url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        self.pubsub.psubscribe(self.PREFIX + "*")
        self.seen: dict[str, float] = {}
        self.changed = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        while not self.stopped:
            message = self.pubsub.get_message(timeout=0.5)
            if message is None:
                continue
            now = time.perf_counter()
            task_id = message["channel"].decode()[len(self.PREFIX) :]
            with self.changed:
                self.seen[task_id] = now
                self.changed.notify_all()

    def wait(self, task_id: str, timeout: float = 60) -> float:
        with self.changed:
            if not self.changed.wait_for(lambda: task_id in self.seen, timeout):
                raise SystemExit(f"no result for {task_id} after {timeout}s")
            return self.seen[task_id]

    def close(self) -> None:
        self.stopped = True
        self.thread.join()
        self.pubsub.close()
        self.client.close()


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    q = statistics.quantiles(ordered, n=100, method="inclusive")
    return q[49], q[98]


@contextmanager
def collector_paused() -> Iterator[None]:
    """This producer's garbage collector out of the way while it times round trips: with
    thousands of results pending, a full collection here paused its sends ~95 ms, which counted
    against the worker's latency."""
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


def latency(app: Celery, users: int, concurrency: int, rate: float, n: int) -> dict[str, Any]:
    kwargs = debit_kwargs(users)
    arrivals = Arrivals(os.environ["TOKENS_RESULT_BACKEND"])
    worker = WorkerProcess("transport-latency", concurrency=concurrency, loglevel="WARNING")
    try:
        with running_workers(app, worker), collector_paused():
            round_trips(app, DEBIT, kwargs, 50)  # warm up
            low: list[float] = []
            results = []
            for i in range(n):
                sent = time.perf_counter()
                result = app.send_task(DEBIT, kwargs=kwargs(i))
                low.append(arrivals.wait(result.id) - sent)
                results.append(result)
            paced: list[tuple[float, Any]] = []
            start = time.perf_counter() + 0.05
            for i in range(n):
                scheduled = start + i / rate
                pause = scheduled - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                paced.append((scheduled, app.send_task(DEBIT, kwargs=kwargs(i))))
            half = [arrivals.wait(r.id) - scheduled for scheduled, r in paced]
            results += [r for _, r in paced]
            failed = [o for o in (r.get(timeout=60) for r in results) if not o.get("success")]
            if failed:
                raise SystemExit(f"latency: {len(failed)} failures, e.g. {failed[0]}")
    finally:
        arrivals.close()
    return {"low": percentiles(low), "half": percentiles(half), "rate": rate}


def checkout_cost(n: int, rounds: int) -> tuple[float, float]:
    """Seconds per unit of work (checkout, one statement, commit) in this process with the pool
    pre-ping on and off, interleaved; medians of ``rounds``."""
    from sqlalchemy import create_engine, text

    url = os.environ["TOKENS_DATABASE_URL"]
    engines = {ping: create_engine(url, pool_pre_ping=ping, pool_size=1) for ping in (True, False)}
    spent: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(rounds):
            for ping, engine in engines.items():
                start = time.perf_counter()
                for _ in range(n):
                    with engine.begin() as conn:
                        conn.execute(text("SELECT 1"))
                spent[ping].append((time.perf_counter() - start) / n)
    finally:
        for engine in engines.values():
            engine.dispose()
    return statistics.median(spent[True]), statistics.median(spent[False])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--latency-samples", type=int, default=2000)
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument("--variant", action="append", default=[], type=parse_variant)
    args = parser.parse_args()
    variants = [Variant("default", {}), *args.variant]

    scratch = Scratch("tokens_bench")
    scratch.export()
    scratch.create()
    try:
        from accounting import accounts
        from worker.db import session_scope
        from worker.migrate import upgrade

        upgrade()
        with session_scope() as s:
            for u in range(args.users):
                accounts.open_account(s, f"user-{u}", initial_balance=10**9)
        app = producer()
        wait = statement_wait(args.users)
        for r in range(args.rounds):
            # Each round starts with another variant, so none is always first (or last).
            for variant in variants[r % len(variants) :] + variants[: r % len(variants)]:
                measure(app, variant, args.tasks, args.users, args.concurrency, wait)
        report(variants, args)
        show_waiting(variants[0], wait)
        on, off = checkout_cost(1000, args.rounds)
        print(
            f"unit of work (checkout, SELECT 1, commit), in-process: pool pre-ping on "
            f"{on * 1e6:.0f} µs, off {off * 1e6:.0f} µs: the ping costs {(on - off) * 1e6:.0f} µs "
            "per checkout"
        )
        if not args.no_latency:
            rate = statistics.median(variants[0].rates[DEBIT]) / 2
            shown = latency(app, args.users, args.concurrency, rate, args.latency_samples)
            show_latency(shown, args.latency_samples)
        with session_scope() as s:
            from accounting.ledger import reconcile

            assert reconcile(s).mismatches == [], "balance differs from ledger after the benchmark"
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        scratch.destroy()


def report(variants: list[Variant], args: argparse.Namespace) -> None:
    print(
        f"{args.tasks} tasks per measure, medians of {args.rounds} interleaved rounds, "
        f"worker concurrency {args.concurrency}, one producer, {args.users} users; "
        f"load {os.getloadavg()[0]:.2f}"
    )
    head = f"{'variant':28} {'no-op/s':>8} {'debit/s':>8} {'ratio':>6} "
    print(
        head + f"{'no-op CPU':>10} {'debit CPU':>10} {'CPU x':>6}  (goals: ratio ≥ 0.7, CPU ≤ 1.5x)"
    )
    base = variants[0]
    for v in variants:
        noop, debit = (statistics.median(v.rates[k]) for k in (NOOP, DEBIT))
        cpu_noop, cpu_debit = v.cpu_ms(NOOP), v.cpu_ms(DEBIT)
        ratios = [d / o for d, o in zip(v.rates[DEBIT], v.rates[NOOP], strict=True)]
        label = (
            v.name if v is base else f"{v.name} ({','.join(f'{k}={x}' for k, x in v.env.items())})"
        )
        print(
            f"{label[:28]:28} {noop:8.0f} {debit:8.0f} {statistics.median(ratios):6.2f} "
            f"{cpu_noop:8.2f}ms {cpu_debit:8.2f}ms {cpu_debit / cpu_noop:6.2f}"
        )
    noop, debit = (statistics.median(base.rates[k]) for k in (NOOP, DEBIT))
    ratio = statistics.median(
        d / o for d, o in zip(base.rates[DEBIT], base.rates[NOOP], strict=True)
    )
    summary.record(
        "tokens.debit end to end vs a Celery no-op (rate)",
        f"debit {debit:.0f}/s",
        f"no-op {noop:.0f}/s",
        ratio,
        ">= 0.7",
        ratio >= 0.7,
    )
    cpu_noop, cpu_debit = base.cpu_ms(NOOP), base.cpu_ms(DEBIT)
    summary.record(
        "tokens.debit worker CPU per task vs a Celery no-op",
        f"debit {cpu_debit:.2f} ms",
        f"no-op {cpu_noop:.2f} ms",
        cpu_debit / cpu_noop,
        "<= 1.5x",
        cpu_debit / cpu_noop <= 1.5,
    )
    show_breakdown(base)
    if len(variants) > 1:
        print(f"{'debit/s vs default, per round':28}", end="")
        for v in variants[1:]:
            per_round = [a / b for a, b in zip(v.rates[DEBIT], base.rates[DEBIT], strict=True)]
            print(f"  {v.name}: {statistics.median(per_round):.2f}", end="")
        print()


def show_waiting(variant: Variant, wait: float) -> None:
    """The no-op that waits as long as a debit waits for its statement: how much of the debit's
    gap to the no-op a wait alone makes, on this transport."""
    noop, waiting, debit = (statistics.median(variant.rates[k]) for k in TASKS)
    cpu_noop, cpu_wait = variant.cpu_ms(NOOP), variant.cpu_ms(WAIT)
    per_round = [d / w for d, w in zip(variant.rates[DEBIT], variant.rates[WAIT], strict=True)]
    print(
        f"a no-op that waits {wait * 1000:.2f} ms (a debit's wait for its statement, measured "
        f"in-process): {waiting:.0f}/s, {waiting / noop:.2f} of the no-op, worker CPU "
        f"{cpu_wait:.2f} ms ({cpu_wait / cpu_noop:.2f}x); the debit is "
        f"{statistics.median(per_round):.2f} of it"
    )
    summary.record(
        "tokens.debit vs a no-op that waits as long as the debit's statement (rate)",
        f"debit {debit:.0f}/s",
        f"waiting no-op {waiting:.0f}/s ({waiting / noop:.2f} of the no-op)",
        statistics.median(per_round),
        "(no goal)",
        None,
    )


def show_breakdown(variant: Variant) -> None:
    """Where the machine's time went per task (medians of the rounds, ms; cores together):
    the debit's extra over the no-op is what keeps its rate below the no-op's."""
    print(f"machine time per task, {variant.name} (ms of CPU, all cores; idle includes I/O wait)")
    print(f"  {'':8}" + "".join(f"{p:>10}" for p in PARTS) + f"{'total':>10}")
    shown: dict[str, list[float]] = {}
    for name, label in ((NOOP, "no-op"), (WAIT, "waiting"), (DEBIT, "debit")):
        shown[name] = [statistics.median(variant.parts[name][p]) * 1000 for p in PARTS]
        row = "".join(f"{x:10.2f}" for x in shown[name])
        print(f"  {label:8}{row}{sum(shown[name]):10.2f}")
    for base, label in ((NOOP, "- no-op"), (WAIT, "- wait")):
        extra = [d - o for d, o in zip(shown[DEBIT], shown[base], strict=True)]
        print(f"  {label:8}" + "".join(f"{x:+10.2f}" for x in extra) + f"{sum(extra):+10.2f}")


def show_latency(shown: dict[str, Any], n: int) -> None:
    (low50, low99), (half50, half99) = shown["low"], shown["half"]
    print(f"debit round trip latency, {n} samples each (goal: p99 at half load ≤ 3x its p50)")
    print(f"  one request outstanding:      p50 {low50 * 1000:6.2f} ms  p99 {low99 * 1000:6.2f} ms")
    print(
        f"  paced at {shown['rate']:4.0f}/s (half max): p50 {half50 * 1000:6.2f} ms  "
        f"p99 {half99 * 1000:6.2f} ms  p99/p50 {half99 / half50:.2f}"
    )
    summary.record(
        f"debit latency at half load ({shown['rate']:.0f}/s): p99 vs p50",
        f"p99 {half99 * 1000:.2f} ms",
        f"p50 {half50 * 1000:.2f} ms",
        half99 / half50,
        "<= 3x",
        half99 / half50 <= 3,
    )


if __name__ == "__main__":
    main()
