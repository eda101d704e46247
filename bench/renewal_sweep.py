"""Benchmark: the renewal sweep fanned out over real workers, against the sequential sweep.

    python -m bench.renewal_sweep              # 1,000,000 due accounts; 2 and 4 worker processes
    python -m bench.renewal_sweep --users 50000 --workers 2

Creates its own PostgreSQL database and claims its own Redis pair (``tests.devenv.Scratch``,
both dropped at the end),
fills the database with due accounts via ``generate_series``, then, from the same starting data
each time, times:

1. the baseline: the sequential sweep in this process (``accounting.renewals.sweep``: the same
   plan, chunk and totals functions, one chunk after another), with its planning step apart;
2. ``renewals.sweep`` sent to N real ``celery -A worker worker -c 1`` processes serving the
   ``renewals`` queue, from send to the contract's result (plan, chunks in parallel, totals);
   and the peak RSS (``VmHWM``) of every worker process, to show memory stays bounded;
3. optionally (``--single-statement``) one set-based statement renewing everyone at once;
4. optionally (``--per-user N``) the seed's one-user-per-transaction design on N users.

After each it checks: every account renewed exactly once, one ``monthly_reset`` entry per
account, and every balance equal to the sum of its ledger.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from tests.devenv import ROOT, Scratch, WorkerProcess, producer, running_workers

# A tenth never renewed, the rest renewed 30..59 days before the seed at any time of day; tiers
# mixed (6 Gift : 3 Professional : 1 Business); a third of the paid users with a future expiry.
SEED_SQL = """
INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, tokens_spent,
                      last_renewal_at, subscription_expires_at, created_at, updated_at)
SELECT 'user-' || lpad(i::text, 8, '0'),
       CASE WHEN i % 10 < 6 THEN 'Gift' WHEN i % 10 < 9 THEN 'Professional' ELSE 'Business' END,
       0, 0, 0,
       CASE WHEN i % 10 = 3 THEN NULL
            ELSE CAST(:now AS timestamptz) - make_interval(days => 30 + i % 30, secs => i % 86400)
       END,
       CASE WHEN i % 10 >= 6 AND i % 3 = 0 THEN CAST(:now AS timestamptz) + interval '90 days' END,
       CAST(:now AS timestamptz) - interval '400 days',
       CAST(:now AS timestamptz) - interval '400 days'
FROM generate_series(1, :users) AS i
"""


@dataclass
class Run:
    name: str
    seconds: float
    users: int
    memory: str = ""

    @property
    def rate(self) -> float:
        return self.users / self.seconds


def maintain(engine: Engine, *tables: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in tables:
            conn.execute(text(f"VACUUM ANALYZE {table}"))
        conn.execute(text("CHECKPOINT"))


def seed(engine: Engine, users: int) -> datetime:
    with engine.begin() as conn:
        now: datetime = conn.execute(text("SELECT now()")).scalar_one()
        conn.execute(text(SEED_SQL), {"now": now, "users": users})
        conn.execute(text("CREATE TABLE accounts_seed AS SELECT * FROM accounts"))
    maintain(engine, "accounts", "accounts_seed")
    return now


def reset(engine: Engine) -> None:
    """Back to the seeded state: every account due, no ledger entry, no sweep."""
    with engine.begin() as conn:
        conn.execute(
            text("TRUNCATE ledger_entries, accounts, sweeps, sweep_chunks RESTART IDENTITY CASCADE")
        )
        conn.execute(text("INSERT INTO accounts SELECT * FROM accounts_seed"))
    maintain(engine, "accounts", "ledger_entries")


def check(engine: Engine, users: int, seeded: datetime) -> None:
    with engine.connect() as conn:
        renewed = conn.execute(
            text("SELECT count(*) FROM accounts WHERE last_renewal_at >= :t"), {"t": seeded}
        ).scalar_one()
        entries, entry_users = conn.execute(
            text(
                "SELECT count(*), count(DISTINCT user_id) FROM ledger_entries"
                " WHERE operation_type = 'monthly_reset' AND kind = 'renewal'"
            )
        ).one()
        mismatches = conn.execute(
            text(
                "SELECT count(*) FROM accounts a LEFT JOIN ("
                "  SELECT user_id, sum(tokens_amount) AS total FROM ledger_entries GROUP BY user_id"
                ") l USING (user_id) WHERE a.tokens_balance <> coalesce(l.total, 0)"
            )
        ).scalar_one()
    problems = []
    if renewed != users:
        problems.append(f"{renewed} of {users} accounts renewed")
    if entries != users or entry_users != users:
        problems.append(f"{entries} monthly_reset entries for {entry_users} users")
    if mismatches:
        problems.append(f"{mismatches} balances differ from their ledger")
    if problems:
        raise SystemExit("CHECK FAILED: " + "; ".join(problems))
    print(f"  check: {users:,} renewed once, {entries:,} monthly_reset entries, balances == ledger")


def timed(name: str, users: int, action: Callable[[], str | None]) -> Run:
    started = time.perf_counter()
    memory = action() or ""
    run = Run(name, time.perf_counter() - started, users, memory)
    print(f"  {name}: {run.seconds:.2f} s, {run.rate:,.0f} users/s {memory}")
    return run


def run_sequential(sessions: sessionmaker[Session], users: int, chunk_size: int) -> str:
    """The in-process sweep, step by step (what ``renewals.sweep`` does) to time planning."""
    from accounting import renewals

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    sweep_id = renewals.new_sweep_id()
    with sessions() as session, session.begin():
        plan = renewals.plan_sweep(session, sweep_id, chunk_size=chunk_size)
    planning = time.perf_counter() - started
    for index in range(plan.chunks):
        renewals.run_chunk(sessions, sweep_id, index)
    with sessions() as session:
        out = renewals.sweep_totals(session, sweep_id)
    if out.successful != users or out.failed or out.skipped:
        raise SystemExit(f"sweep renewed {out.successful} of {users}: {out}")
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"  planning: {planning:.2f} s for {plan.chunks} chunks")
    return f"(peak RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB)"


def peak_rss_mib(pgid: int) -> list[tuple[int, bool, float]]:
    """(pid, is_main, VmHWM in MiB) of every process in a worker's process group."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[2]) != pgid:  # pgrp
                continue
            status = (entry / "status").read_text()
        except (OSError, ValueError):
            continue
        hwm = next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM")), 0
        )
        found.append((int(entry.name), int(entry.name) == pgid, hwm / 1024))
    return found


def run_fanned_out(workers: list[WorkerProcess], users: int) -> str:
    app = producer()
    result = app.send_task("renewals.sweep", kwargs={}, queue="renewals")
    out = result.get(timeout=3600)
    if out["successful"] != users or out["failed"] or out["skipped"]:
        raise SystemExit(f"sweep renewed {out['successful']} of {users}: {out}")
    children: list[float] = []
    mains: list[float] = []
    for w in workers:
        assert w.proc is not None
        for _pid, is_main, mib in peak_rss_mib(w.proc.pid):
            (mains if is_main else children).append(mib)
    return (
        f"(peak RSS per pool process {min(children):.0f}-{max(children):.0f} MiB,"
        f" per main process {min(mains):.0f}-{max(mains):.0f} MiB)"
    )


def run_single_statement(engine: Engine) -> None:
    from accounting.renewals import plans_at, statements

    sql = f"""
WITH {statements._TIERS},
renewed AS (
    UPDATE accounts a
    SET tokens_balance = a.tokens_balance + t.allocation, last_renewal_at = :now,
        updated_at = GREATEST(clock_timestamp(), a.updated_at)
    FROM tiers t
    WHERE a.tier = t.tier AND (a.last_renewal_at IS NULL OR a.last_renewal_at < t.cutoff)
      AND (NOT t.paid OR a.subscription_expires_at IS NULL OR a.subscription_expires_at > :now)
    RETURNING a.user_id, a.tier, a.tokens_balance, t.allocation, a.updated_at
)
INSERT INTO ledger_entries
    (user_id, kind, operation_type, tokens_amount, balance_before, balance_after, metadata,
     created_at)
SELECT user_id, 'renewal', 'monthly_reset', allocation, tokens_balance - allocation,
       tokens_balance,
       jsonb_build_object('tier', tier, 'source', CAST(:source AS text)), updated_at
FROM renewed
"""
    with engine.begin() as conn:
        now: datetime = conn.execute(text("SELECT now()")).scalar_one()
        conn.execute(text(sql), statements.statement_params(plans_at(now), now))


def run_per_user(sessions: sessionmaker[Session], sample: int) -> None:
    """The seed's design: load the users, then check and renew each in its own transaction."""
    from accounting import renewals

    with sessions() as session:
        user_ids = list(
            session.execute(
                text("SELECT user_id FROM accounts ORDER BY user_id LIMIT :n"), {"n": sample}
            ).scalars()
        )
    for user_id in user_ids:
        with sessions() as session, session.begin():
            if renewals.check_eligibility(session, user_id).eligible:
                renewals.renew_user(session, user_id)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=5000)
    parser.add_argument(
        "--workers",
        default="2,4",
        help="worker process counts to run the fanned-out sweep on (default: 2,4)",
    )
    parser.add_argument(
        "--single-statement", action="store_true", help="also time one set-based statement"
    )
    parser.add_argument(
        "--per-user",
        type=int,
        default=0,
        metavar="N",
        help="also time the one-user-per-transaction design on N users (its rate is shown)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log each sweep chunk")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(message)s",
        stream=sys.stdout,
    )
    counts = [int(n) for n in args.workers.split(",") if n]

    scratch = Scratch("tokens_bench")
    scratch.export()  # before anything reads the settings: this process and the workers
    os.environ["TOKENS_SWEEP_CHUNK_SIZE"] = str(args.chunk_size)
    os.environ["TOKENS_TASK_EVENTS"] = "false"
    scratch.create()

    from worker.db import make_engine
    from worker.migrate import upgrade

    engine = make_engine(scratch.database_url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    logs = ROOT / "var" / "bench-logs"
    try:
        print(f"database {scratch.db_name}: migrating, seeding {args.users:,} due accounts ...")
        upgrade(scratch.database_url)
        started = time.perf_counter()
        seeded = seed(engine, args.users)
        print(f"  seeded in {time.perf_counter() - started:.1f} s")

        runs: list[Run] = []
        print("1. baseline: the sequential sweep in this process")
        reset(engine)
        runs.append(
            timed(
                "sequential, in-process",
                args.users,
                lambda: run_sequential(sessions, args.users, args.chunk_size),
            )
        )
        check(engine, args.users, seeded)

        for n in counts:
            print(f"2. renewals.sweep fanned out over {n} worker processes")
            reset(engine)
            workers = [
                WorkerProcess(
                    f"bench{n}-{i}",
                    concurrency=1,
                    queues="renewals",
                    loglevel="WARNING",
                    log_path=logs / f"bench{n}-{i}-{os.getpid()}.log",
                )
                for i in range(n)
            ]
            with running_workers(producer(), *workers):
                action = functools.partial(run_fanned_out, workers, args.users)
                runs.append(timed(f"fanned out, {n} worker processes", args.users, action))
            check(engine, args.users, seeded)

        if args.single_statement:
            print("3. one set-based statement (UPDATE ... RETURNING -> INSERT, one transaction)")
            reset(engine)
            runs.append(timed("single statement", args.users, lambda: run_single_statement(engine)))
            check(engine, args.users, seeded)

        if args.per_user:
            sample = min(args.per_user, args.users)
            print(f"4. one user per transaction, {sample:,} users (the seed's design)")
            reset(engine)
            runs.append(
                timed("one user per transaction", sample, lambda: run_per_user(sessions, sample))
            )

        base = runs[0]
        chunks = -(-args.users // args.chunk_size)
        print()
        print(f"users: {args.users:,}; chunk size {args.chunk_size:,} ({chunks:,} chunks)")
        print(f"| {'run':<36} | {'time':>9} | {'users/s':>9} | {'speed-up':>8} | memory")
        print(f"| {'-' * 36} | {'-' * 9} | {'-' * 9} | {'-' * 8} | ------")
        for r in runs:
            # Throughput ratio, so a run on a sample compares fairly.
            print(
                f"| {r.name:<36} | {r.seconds:7.2f} s | {r.rate:>9,.0f} |"
                f" {r.rate / base.rate:7.2f}x | {r.memory}"
            )
    finally:
        engine.dispose()
        scratch.destroy()


if __name__ == "__main__":
    main()
