"""Benchmark: pruning the oldest months, whole months dropped against entry by entry.

    python -m bench.ledger_prune                     # 100,000 users x 100 entries over 400 days
    python -m bench.ledger_prune --users 10000       # a quick look

Seeds one database as ``bench.ledger_reads`` does (each user's entries about four days apart
over 400 days, in the ledger's months, one partition each), copies it (``CREATE DATABASE ...
TEMPLATE``), and prunes both at the same cutoff, ``--days`` (100) after the first entry: three
whole months and part of a fourth (``--whole-months``: the fourth's first instant).

- baseline: entry by entry only (``tokens_prune``, 1,000 users a transaction), as every prune
  ran before migration 0036;
- ``ledger.delete_old_entries_in_chunks``, what ``ledger.delete_old_entries`` and ``tokens
  delete-old-entries`` run: the months wholly before the cutoff dropped in one transaction
  (``tokens_prune_months``), then what is left entry by entry.

Both must leave the same ledger (per user the same carried_forward sum, entry count and hash,
and the same entries kept, balances equal to their ledger): it checks. Prints each time, the
ratio, and the ledger's size on disk after each.
"""

from __future__ import annotations

import argparse
import time
from datetime import datetime, timedelta

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.orm import sessionmaker

from bench import summary
from bench.ledger_reads import seed
from bench.renewal_sweep import maintain
from tests.devenv import PG_ADMIN_URL, Scratch
from tests.layout import month_start

# What a prune leaves, to compare: per user the checkpoint and what was kept.
LEFT = """
SELECT e.user_id,
       sum(e.tokens_amount) FILTER (WHERE e.kind = 'carried_forward') AS carried,
       max((e.metadata->>'entries')::int) FILTER (WHERE e.kind = 'carried_forward') AS entries,
       max(e.hash) FILTER (WHERE e.kind = 'carried_forward') AS hash,
       count(*) FILTER (WHERE e.kind <> 'carried_forward') AS kept,
       sum(e.tokens_amount) AS total, min(a.tokens_balance) AS balance
FROM ledger_entries e JOIN accounts a ON a.user_id = e.user_id
GROUP BY e.user_id ORDER BY e.user_id
"""
SIZE = (
    "SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid))) FROM pg_inherits"
    " WHERE inhparent IN ('ledger_entries'::regclass, 'entry_grants'::regclass)"
)


def entry_by_entry(engine: Engine, cutoff: datetime) -> int:
    """Every user's entries before ``cutoff`` pruned by ``tokens_prune`` alone, 1,000 users a
    transaction: the entries removed."""
    deleted, after = 0, None
    while True:
        with engine.begin() as conn:
            row = conn.execute(
                text("SELECT * FROM tokens_prune(:after, 1000, :cutoff, :older_than)"),
                {"after": after, "cutoff": cutoff, "older_than": cutoff.isoformat()},
            ).one()
        if not row.users:
            return deleted
        deleted += int(row.deleted)
        after = row.users[-1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--per-user", type=int, default=100)
    parser.add_argument("--days", type=int, default=100, help="the cutoff, after the first entry")
    parser.add_argument(
        "--whole-months",
        action="store_true",
        help="move the cutoff back to its month's first instant: nothing left entry by entry",
    )
    args = parser.parse_args(argv)

    scratch = Scratch("tokens_bench_prune")
    scratch.export()

    from accounting import ledger, months
    from worker.db import make_engine
    from worker.migrate import upgrade

    scratch.create()
    copy = f"{scratch.db_name}_copy"
    copy_url = scratch.database_url.rsplit("/", 1)[0] + "/" + copy
    engine = make_engine(scratch.database_url)
    copy_engine = make_engine(copy_url)
    try:
        rows = args.users * args.per_user
        print(f"database {scratch.db_name}: migrating, seeding {rows:,} ledger rows ...")
        upgrade(scratch.database_url)
        seed(engine, args.users, args.per_user)
        engine.dispose()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{copy}" TEMPLATE "{scratch.db_name}"')
        maintain(copy_engine, "ledger_entries", "entry_grants")
        with engine.connect() as conn:
            first: datetime = conn.execute(
                text("SELECT min(created_at) FROM ledger_entries")
            ).scalar_one()
            before_size = conn.execute(text(SIZE)).scalar_one()
            cutoff = first + timedelta(days=args.days)
            if args.whole_months:
                cutoff = month_start(conn, 0, cutoff)
        print(f"{rows:,} rows ({before_size}); pruning everything before {cutoff:%Y-%m-%d %H:%M}")

        started = time.perf_counter()
        baseline_deleted = entry_by_entry(engine, cutoff)
        baseline = time.perf_counter() - started
        print(f"  entry by entry: {baseline_deleted:,} entries in {baseline:.1f} s")

        sessions = sessionmaker(bind=copy_engine, expire_on_commit=False)
        started = time.perf_counter()
        with sessions() as s, s.begin():
            dropped, dropped_entries = months.drop_old_months(s, cutoff)
        drop = time.perf_counter() - started
        rest = ledger.delete_old_entries_in_chunks(sessions, cutoff).deleted
        total = time.perf_counter() - started
        print(
            f"  months dropped: {len(dropped)} partitions, {dropped_entries:,} entries in"
            f" {drop:.1f} s; then {rest:,} entry by entry; {total:.1f} s in all"
        )

        with engine.connect() as a, copy_engine.connect() as b:
            left_a, left_b = a.execute(text(LEFT)).all(), b.execute(text(LEFT)).all()
            sizes = a.execute(text(SIZE)).scalar_one(), b.execute(text(SIZE)).scalar_one()
        assert baseline_deleted == dropped_entries + rest, (baseline_deleted, dropped_entries, rest)
        assert left_a == left_b, "the two prunes left different ledgers"
        assert all(r.total == r.balance for r in left_b), "a balance differs from its ledger"
        print(f"  same ledger left by both ({len(left_b):,} users); sizes {sizes[0]}, {sizes[1]}")

        ratio = baseline / total
        print(f"\n| prune of {baseline_deleted:,} of {rows:,} entries | time | vs entry by entry |")
        print("| --- | --- | --- |")
        print(f"| entry by entry (baseline) | {baseline:.1f} s | 1.0x |")
        print(f"| months dropped, then the rest | {total:.1f} s | {ratio:.1f}x faster |")
        summary.record(
            f"prune of {baseline_deleted:,} of {rows:,} entries, months dropped whole",
            f"{total:.1f} s",
            f"entry by entry {baseline:.1f} s",
            ratio,
            "faster than entry by entry",
            ratio > 1,
        )
    finally:
        engine.dispose()
        copy_engine.dispose()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{copy}" WITH (FORCE)')
        scratch.destroy()


if __name__ == "__main__":
    main()
