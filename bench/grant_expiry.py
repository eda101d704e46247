"""Benchmark: ``grants.expire`` (chunked) on a million due grants, against one statement.

    python -m bench.grant_expiry                  # 1,000,000 users, one due grant each
    python -m bench.grant_expiry --users 100000 --chunk-size 5000

Creates its own PostgreSQL database (``tests.devenv.Scratch``, dropped at the end), fills it via
``generate_series`` with users who each hold one due ``purchased`` grant (credited through a
ledger entry and its split, so every invariant holds) and a never-expiring ``adjustment`` grant,
then, from the same starting data each time, times:

1. the baseline: ``tokens_lock`` (the lock and ``tokens_expire_due``, what every movement runs
   first) over every account in one statement and one transaction;
2. ``accounting.expiry.expire_all``: what ``grants.expire`` runs, one transaction per chunk
   (lock a chunk's accounts with SKIP LOCKED, then ``tokens_lock`` for each), with this
   process's peak RSS before and after, to show memory stays bounded.

After each it checks: every due grant expired once, one ``expiry`` entry per grant with its
split, and every balance equal to its ledger and to its grants.
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from bench import summary
from bench.renewal_sweep import Run, maintain
from tests.devenv import Scratch

TABLES = ("accounts", "grants", "ledger_entries", "entry_grants")

# User i: a 100-token adjustment grant (id 2i - 1, never expires) and a 40-token purchase
# (id 2i) that ended up to a day before the seed; each made by a ledger entry with its split.
SEED_SQL = [
    """
    INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, tokens_spent, debt,
                          created_at, updated_at)
    SELECT 'user-' || lpad(i::text, 8, '0'), 'Gift', 140, 0, 0, 0,
           CAST(:now AS timestamptz) - interval '40 days',
           CAST(:now AS timestamptz) - interval '30 days'
    FROM generate_series(1, :users) AS i
    """,
    """
    INSERT INTO grants (id, user_id, kind, amount, remaining, held, spent, expired, returned,
                        priority, expires_at, status, created_at)
    SELECT 2 * i - 1 + k, 'user-' || lpad(i::text, 8, '0'),
           CASE k WHEN 0 THEN 'adjustment' ELSE 'purchased' END,
           CASE k WHEN 0 THEN 100 ELSE 40 END, CASE k WHEN 0 THEN 100 ELSE 40 END, 0, 0, 0, 0,
           50,
           CASE k WHEN 1 THEN CAST(:now AS timestamptz) - make_interval(secs => 1 + i % 86400)
           END,
           'active', CAST(:now AS timestamptz) - make_interval(days => 40 - 10 * k)
    FROM generate_series(1, :users) AS i, generate_series(0, 1) AS k
    """,
    """
    INSERT INTO ledger_entries (id, user_id, kind, operation_type, tokens_amount,
                                balance_before, balance_after, metadata, created_at)
    SELECT 2 * i - 1 + k, 'user-' || lpad(i::text, 8, '0'),
           CASE k WHEN 0 THEN 'adjustment' ELSE 'credit' END,
           CASE k WHEN 0 THEN 'initial_balance' ELSE 'purchase' END,
           CASE k WHEN 0 THEN 100 ELSE 40 END, 100 * k, 100 + 40 * k, '{}',
           CAST(:now AS timestamptz) - make_interval(days => 40 - 10 * k)
    FROM generate_series(1, :users) AS i, generate_series(0, 1) AS k
    """,
    "INSERT INTO entry_grants (entry_id, grant_id, amount, seq)"
    " SELECT id, id, tokens_amount, 0 FROM ledger_entries",
]


def seed(engine: Engine, users: int) -> datetime:
    with engine.begin() as conn:
        now: datetime = conn.execute(text("SELECT now()")).scalar_one()
        for sql in SEED_SQL:
            conn.execute(text(sql), {"now": now, "users": users})
        for table in TABLES:
            conn.execute(text(f"CREATE TABLE {table}_seed AS SELECT * FROM {table}"))
    maintain(engine, *TABLES, *(f"{t}_seed" for t in TABLES))
    return now


def reset(engine: Engine) -> None:
    """Back to the seeded state: every purchase due, no expiry written."""
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
        for table in TABLES:
            conn.execute(text(f"INSERT INTO {table} SELECT * FROM {table}_seed"))
        for table in ("grants", "ledger_entries"):
            conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" (SELECT max(id) FROM {table}))"
                )
            )
    maintain(engine, *TABLES)


def check(engine: Engine, users: int) -> None:
    with engine.connect() as conn:
        expired, tokens = conn.execute(
            text("SELECT count(*), coalesce(sum(expired), 0) FROM grants WHERE status = 'expired'")
        ).one()
        entries, splits = conn.execute(
            text(
                "SELECT count(DISTINCT e.id), count(eg.entry_id) FROM ledger_entries e"
                " LEFT JOIN entry_grants eg ON eg.entry_id = e.id AND eg.grant_id ="
                " CAST(e.metadata ->> 'grant_id' AS bigint) AND eg.amount = e.tokens_amount"
                " WHERE e.kind = 'expiry'"
            )
        ).one()
        mismatches = conn.execute(
            text(
                "SELECT count(*) FROM accounts a"
                " LEFT JOIN (SELECT user_id, sum(tokens_amount) AS total FROM ledger_entries"
                "            GROUP BY user_id) l USING (user_id)"
                " LEFT JOIN (SELECT user_id, sum(remaining) AS total FROM grants"
                "            WHERE status = 'active' GROUP BY user_id) g USING (user_id)"
                " WHERE a.tokens_balance <> coalesce(l.total, 0)"
                "    OR a.tokens_balance <> coalesce(g.total, 0) - a.debt"
                "    OR a.tokens_balance <> 100"
            )
        ).scalar_one()
    problems = []
    if (expired, tokens) != (users, 40 * users):
        problems.append(f"{expired} grants expired ({tokens} tokens) of {users}")
    if (entries, splits) != (users, users):
        problems.append(f"{entries} expiry entries, {splits} matching splits")
    if mismatches:
        problems.append(f"{mismatches} balances differ from their ledger or grants")
    if problems:
        raise SystemExit("CHECK FAILED: " + "; ".join(problems))
    print(f"  check: {users:,} grants expired once, one entry and split each, balances exact")


def run_single_statement(engine: Engine) -> None:
    """What a chunk does to each user (tokens_lock, which expires their due grants), over every
    account in one statement and one transaction, with no chunking and no events."""
    with engine.begin() as conn:
        conn.execute(text("SELECT count(*) FROM accounts a, LATERAL tokens_lock(a.user_id) x"))


def run_chunked(sessions: sessionmaker[Session], users: int, chunk_size: int) -> str:
    from accounting import expiry

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expired, tokens = expiry.expire_all(sessions, chunk_size=chunk_size)
    if (expired, tokens) != (users, 40 * users):
        raise SystemExit(f"expire_all expired {expired} grants, {tokens} tokens of {users}")
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"(peak RSS {rss_before / 1024:.0f} -> {rss_after / 1024:.0f} MiB)"


def timed(name: str, users: int, action: Callable[[], str | None]) -> Run:
    started = time.perf_counter()
    memory = action() or ""
    run = Run(name, time.perf_counter() - started, users, memory)
    print(f"  {name}: {run.seconds:.2f} s, {run.rate:,.0f} grants/s {memory}")
    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=5000)
    args = parser.parse_args(argv)

    scratch = Scratch("tokens_bench_expiry")
    scratch.export()
    scratch.create()

    from worker.db import make_engine
    from worker.migrate import upgrade

    engine = make_engine(scratch.database_url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    try:
        print(f"database {scratch.db_name}: migrating, seeding {args.users:,} due grants ...")
        upgrade(scratch.database_url)
        started = time.perf_counter()
        seed(engine, args.users)
        print(f"  seeded in {time.perf_counter() - started:.1f} s")

        print("1. baseline: one set-based statement, one transaction")
        reset(engine)
        base = timed("single statement", args.users, lambda: run_single_statement(engine))
        check(engine, args.users)

        print(f"2. grants.expire: expire_all, chunks of {args.chunk_size:,}")
        reset(engine)
        chunked = timed(
            "expire_all, chunked",
            args.users,
            lambda: run_chunked(sessions, args.users, args.chunk_size),
        )
        check(engine, args.users)

        chunks = -(-args.users // args.chunk_size)
        print()
        print(f"due grants: {args.users:,}; chunk size {args.chunk_size:,} ({chunks:,} chunks)")
        print(f"| {'run':<24} | {'time':>9} | {'grants/s':>9} | {'vs single':>9} | memory")
        print(f"| {'-' * 24} | {'-' * 9} | {'-' * 9} | {'-' * 9} | ------")
        for r in (base, chunked):
            print(
                f"| {r.name:<24} | {r.seconds:7.2f} s | {r.rate:>9,.0f} |"
                f" {r.seconds / base.seconds:8.2f}x | {r.memory}"
            )
        ratio = chunked.seconds / base.seconds
        summary.record(
            f"grants.expire chunked vs one statement, {args.users:,} due grants (time)",
            f"{chunked.seconds:.2f} s",
            f"one statement {base.seconds:.2f} s",
            ratio,
            "<= 2x",
            ratio <= 2,
        )
    finally:
        engine.dispose()
        scratch.destroy()


if __name__ == "__main__":
    main()
