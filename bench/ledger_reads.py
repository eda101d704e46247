"""Benchmark: a user's history page and a month's statistics at 10 million ledger rows.

    python -m bench.ledger_reads                          # 100,000 users x 100 entries
    python -m bench.ledger_reads --users 10000 --reps 500 # a quick look
    python -m bench.ledger_reads --keep                   # keep the database, print its name
    python -m bench.ledger_reads --reuse tokens_bench_reads_...   # time a kept one again

Creates its own PostgreSQL database (``tests.devenv.Scratch``, dropped at the end unless
``--keep``) and fills it set-based (``generate_series``): every user holds a never-expiring
adjustment grant (credited by the first entry) and an allowance expiring in a month (credited by
the second), then spends one token at a time. Entries are written in time order across all
users (each user's rows lie on as many pages as they have entries, as in production), about four
days apart over 400 days, each with its split across grants (``entry_grants``), in the ledger's
months (one partition per month, migration 0036) over those 400 days.

Then, for random users, each read in its own transaction as a task runs it, it times:

0. the baseline: ``SELECT 1`` in a session (a round trip and a commit: the floor of any read);
   the newest page read as it once was (entries, then their splits: two round trips) and as
   0036 read it (the account, then one statement planned for each call, built row by row);
1. ``ledger.user_entries`` limit 50, offset 0 (the newest page), and offset 50 (the oldest page
   of a 100-entry history): one call of ``tokens_page`` (the page, its splits, the due probe);
2. ``ledger.statistics`` over a one-month period at a random point of the history.

Before timing, it reads what those reads read once (``pg_prewarm`` into the operating system's
cache: the ledger's months, their index by user, the splits' key, accounts and grants), as a
server that has been serving pages holds them in memory: right
after seeding or a restart, a page's table pages come from disk, and at 50 million rows the
first tens of thousands of reads measure the disk, not the page. ``--cold`` skips it.

It prints p50/p99 for each, the ratio to the baseline, the goals (history page p99 < 5 ms,
month statistics p99 < 20 ms) and ``EXPLAIN (ANALYZE, BUFFERS)`` of every statement one call of
each read runs, which names the index used.
"""

from __future__ import annotations

import argparse
import random
import statistics as stats
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from bench import summary
from bench.renewal_sweep import maintain
from models.schemas import EntryOut
from tests.devenv import Scratch
from tests.layout import months_since

DAYS = 400

SEED_SQL = [
    """
    INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, tokens_spent, debt,
                          created_at, updated_at)
    SELECT 'user-' || lpad(u::text, 8, '0'), 'Gift',
           10100 - (:per_user - 2), 0, :per_user - 2, 0,
           CAST(:start AS timestamptz), CAST(:now AS timestamptz)
    FROM generate_series(1, :users) AS u
    """,
    """
    INSERT INTO grants (id, user_id, kind, amount, remaining, held, spent, expired, returned,
                        priority, expires_at, status, created_at)
    SELECT 2 * u - 1 + k, 'user-' || lpad(u::text, 8, '0'),
           CASE k WHEN 0 THEN 'adjustment' ELSE 'allowance' END,
           CASE k WHEN 0 THEN 10000 ELSE 100 END,
           CASE k WHEN 0 THEN 10000 - (:per_user - 2) ELSE 100 END, 0,
           CASE k WHEN 0 THEN :per_user - 2 ELSE 0 END, 0, 0,
           CASE k WHEN 0 THEN 90 ELSE 10 END,
           CASE k WHEN 1 THEN CAST(:now AS timestamptz) + interval '30 days' END,
           'active', CAST(:start AS timestamptz) + make_interval(days => 4 * k)
    FROM generate_series(1, :users) AS u, generate_series(0, 1) AS k
    """,
    # Entry k of user u: id k * users + u (time order across users), four days apart.
    """
    INSERT INTO ledger_entries (id, user_id, kind, operation_type, tokens_amount,
                                balance_before, balance_after, metadata, created_at,
                                prev_hash, hash)
    SELECT k * :users + u, 'user-' || lpad(u::text, 8, '0'),
           CASE k WHEN 0 THEN 'adjustment' WHEN 1 THEN 'renewal' ELSE 'debit' END,
           CASE k WHEN 0 THEN 'adjustment' WHEN 1 THEN 'monthly_reset'
                  ELSE (ARRAY['image_generation', 'sora_image', 'product_card',
                              'chatgpt_message'])[1 + k % 4] END,
           CASE k WHEN 0 THEN 10000 WHEN 1 THEN 100 ELSE -1 END,
           CASE k WHEN 0 THEN 0 WHEN 1 THEN 10000 ELSE 10100 - (k - 2) END,
           CASE k WHEN 0 THEN 10000 WHEN 1 THEN 10100 ELSE 10100 - (k - 1) END,
           CASE WHEN k < 2 THEN '{}'::json ELSE json_build_object('request', k) END,
           CAST(:start AS timestamptz) + make_interval(days => 4 * k, secs => u % 86400),
           repeat('0', 64), repeat('0', 64)  -- no chain: these reads never look at it
    FROM generate_series(0, :per_user - 1) AS k, generate_series(1, :users) AS u
    ORDER BY k, u
    """,
    """
    INSERT INTO entry_grants (entry_id, grant_id, amount, seq, created_at)
    SELECT id, CASE WHEN (id - 1) / :users = 1 THEN 2 * ((id - 1) % :users + 1)
                    ELSE 2 * ((id - 1) % :users + 1) - 1 END,
           tokens_amount, 0, created_at
    FROM ledger_entries ORDER BY id
    """,
]
TABLES = ("accounts", "grants", "ledger_entries", "entry_grants")
# What the old pages read of each entry: the contract's fields but the splits (read apart).
_COLUMNS = tuple(name for name in EntryOut.model_fields if name != "grants")


def seed(engine: Engine, users: int, per_user: int) -> None:
    """The rows, with the bulk tables' secondary indexes built after (as a restore would)."""
    with engine.begin() as conn:
        now: datetime = conn.execute(text("SELECT now()")).scalar_one()
        start = now - timedelta(days=DAYS)
        # The ledger's months over the history, as a worker running that long has them.
        print(f"  {months_since(conn, start)} months")
        indexes = conn.execute(
            text(
                "SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x"
                " JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid"
                " WHERE t.relname IN ('ledger_entries', 'entry_grants')"
                " AND NOT EXISTS (SELECT FROM pg_constraint c WHERE c.conindid = i.oid)"
            )
        ).all()
        for name, _ in indexes:
            conn.execute(text(f"DROP INDEX {name}"))
        # The seed is consistent by construction: skip per-row foreign-key triggers.
        conn.execute(text("SET LOCAL session_replication_role = replica"))
        params = {"now": now, "start": start, "users": users, "per_user": per_user}
        for sql in SEED_SQL:
            started = time.perf_counter()
            conn.execute(text(sql), params)
            print(f"  {sql.split()[2]}: {time.perf_counter() - started:.1f} s")
        conn.execute(text("SET LOCAL maintenance_work_mem = '512MB'"))
        started = time.perf_counter()
        for _, ddl in indexes:
            # A partitioned table's index is defined ON ONLY the parent: made so, it would
            # stay invalid, with no part on any month.
            conn.execute(text(ddl.replace(" ON ONLY ", " ON ")))
        print(f"  {len(indexes)} indexes: {time.perf_counter() - started:.1f} s")
        for table in ("grants", "ledger_entries"):
            conn.execute(
                text(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" (SELECT max(id) FROM {table}))"
                )
            )
    maintain(engine, *TABLES)


# What the reads read: the ledger's months and their index by user, the splits' key, accounts
# and grants with their indexes. Not the rest (the splits' table, the ledger's other indexes):
# at 50 million rows everything together is larger than this machine's memory.
_RELATIONS = """
SELECT r::regclass::text FROM (
    SELECT inhrelid AS r FROM pg_inherits WHERE inhparent = 'ledger_entries'::regclass
    UNION ALL
    SELECT x.indexrelid FROM pg_index x JOIN pg_inherits h ON h.inhrelid = x.indrelid
    JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
    WHERE (h.inhparent = 'ledger_entries'::regclass AND a.attname = 'user_id')
       OR (h.inhparent = 'entry_grants'::regclass AND x.indisprimary)
    UNION ALL
    SELECT c.oid FROM pg_class c WHERE c.relname IN ('accounts', 'grants')
    UNION ALL
    SELECT x.indexrelid FROM pg_index x
    WHERE x.indrelid IN ('accounts'::regclass, 'grants'::regclass)
) relations
"""


def prewarm(engine: Engine) -> None:
    """Read what the reads read once into the operating system's cache."""
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_prewarm"))
        names = conn.execute(text(_RELATIONS)).scalars().all()
        blocks = sum(
            conn.execute(text("SELECT pg_prewarm(:r, 'read')"), {"r": name}).scalar_one()
            for name in names
        )
    print(
        f"  read in {blocks * 8 / 1024:,.0f} MB of {len(names)} tables and indexes"
        f" (pg_prewarm) in {time.perf_counter() - started:.1f} s"
    )


@dataclass
class Timing:
    name: str
    samples: list[float]

    def pct(self, p: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    @property
    def p50(self) -> float:
        return stats.median(self.samples) * 1000


def time_reads(
    name: str, sessions: sessionmaker[Session], reps: int, read: Callable[[Session], Any]
) -> Timing:
    samples = []
    for _ in range(reps):
        started = time.perf_counter()
        with sessions() as session, session.begin():
            read(session)
        samples.append(time.perf_counter() - started)
    timing = Timing(name, samples)
    print(f"  {name}: p50 {timing.p50:.2f} ms, p99 {timing.pct(0.99):.2f} ms")
    return timing


def explain(
    engine: Engine, sessions: sessionmaker[Session], read: Callable[[Session], Any]
) -> None:
    """``EXPLAIN (ANALYZE, BUFFERS)`` of every statement ``read`` runs, as it ran them."""
    seen: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "now()" not in statement:
            seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", capture)
    try:
        with sessions() as session, session.begin():
            read(session)
    finally:
        event.remove(engine, "before_cursor_execute", capture)
    with engine.connect() as conn:
        for statement, params in seen:
            plan = conn.exec_driver_sql(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + statement, params
            ).all()
            print("    " + " ".join(statement.split())[:160])
            for (line,) in plan:
                print("      " + line)
        conn.rollback()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--per-user", type=int, default=100)
    parser.add_argument("--reps", type=int, default=3000)
    parser.add_argument("--keep", action="store_true", help="keep the database")
    parser.add_argument("--reuse", metavar="DB", help="time a database kept by --keep")
    parser.add_argument("--seed", type=int, default=12)
    parser.add_argument("--cold", action="store_true", help="time without reading it in first")
    args = parser.parse_args(argv)

    scratch = Scratch("tokens_bench_reads")
    if args.reuse:
        scratch.db_name = args.reuse
        scratch.database_url = scratch.database_url.rsplit("/", 1)[0] + "/" + args.reuse
        scratch.env["TOKENS_DATABASE_URL"] = scratch.database_url
    scratch.export()

    from accounting import grants, ledger
    from worker.db import make_engine
    from worker.migrate import upgrade

    if not args.reuse:
        scratch.create()
    engine = make_engine(scratch.database_url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    rng = random.Random(args.seed)
    try:
        if not args.reuse:
            rows = args.users * args.per_user
            print(f"database {scratch.db_name}: migrating, seeding {rows:,} ledger rows ...")
            upgrade(scratch.database_url)
            started = time.perf_counter()
            seed(engine, args.users, args.per_user)
            print(f"  seeded in {time.perf_counter() - started:.1f} s")
        else:
            upgrade(scratch.database_url)  # a kept database gets any new migration
            maintain(engine, *TABLES)
        with engine.connect() as conn:
            rows, start = conn.execute(
                text("SELECT count(*), min(created_at) FROM ledger_entries")
            ).one()
            size = conn.execute(
                text(
                    "SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid)))"
                    " FROM pg_inherits WHERE inhparent = 'ledger_entries'::regclass"
                )
            ).scalar_one()
        users = args.users
        print(f"{rows:,} ledger rows ({size} with indexes), {users:,} users")
        if not args.cold:
            prewarm(engine)

        def user() -> str:
            return f"user-{rng.randint(1, users):08d}"

        def month() -> tuple[datetime, datetime]:
            begin = start + timedelta(days=rng.uniform(0, DAYS - 30))
            return begin, begin + timedelta(days=30)

        def two_queries(s: Session) -> Any:
            """The page as it was read before: entries, then their splits (two round trips)."""
            from sqlalchemy import select

            from models.schemas import EntrySplit
            from models.tables import LedgerEntry, entry_grant_table

            who = user()
            grants.settle_reads(s, who)
            rows = s.execute(
                select(*(LedgerEntry.__table__.c[c] for c in _COLUMNS))
                .where(LedgerEntry.user_id == who)
                .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc())
                .limit(50)
            ).all()
            eg = entry_grant_table.c
            splits: dict[int, list[EntrySplit]] = {}
            for entry_id, grant_id, amount in s.execute(
                select(eg.entry_id, eg.grant_id, eg.amount)
                .where(eg.entry_id.in_([e.id for e in rows]))
                .order_by(eg.entry_id, eg.seq)
            ):
                splits.setdefault(entry_id, []).append(
                    EntrySplit(grant_id=str(grant_id), amount=amount)
                )
            return [ledger.entry_out(e, splits.get(e.id)) for e in rows]

        def per_call_plan(s: Session) -> Any:
            """The page as 0036 read it: the account looked up, then one statement of the
            page, its splits and the due probe, planned for each call, built row by row."""
            from sqlalchemy import exists, func, literal_column, select
            from sqlalchemy.dialects.postgresql import aggregate_order_by

            from models.schemas import EntriesOut, EntrySplit
            from models.tables import Account, LedgerEntry, entry_grant_table, grant_table

            who = user()
            s.execute(select(Account.pool_id).where(Account.user_id == who)).scalar_one()
            eg = entry_grant_table.c
            split = (
                select(
                    func.json_agg(
                        aggregate_order_by(func.json_build_array(eg.grant_id, eg.amount), eg.seq)
                    )
                )
                .where(eg.entry_id == LedgerEntry.id, eg.created_at == LedgerEntry.created_at)
                .scalar_subquery()
            )
            rows = s.execute(
                select(*(LedgerEntry.__table__.c[c] for c in _COLUMNS), split.label("splits"))
                .add_columns(
                    exists()
                    .where(
                        grant_table.c.user_id == who,
                        func.tokens_grant_due(literal_column("grants"), func.clock_timestamp()),
                    )
                    .label("due")
                )
                .where(LedgerEntry.user_id == who)
                .order_by(LedgerEntry.created_at.desc(), LedgerEntry.id.desc())
                .limit(50)
            ).all()
            return EntriesOut(
                entries=[
                    ledger.entry_out(
                        r, [EntrySplit(grant_id=str(g), amount=int(a)) for g, a in r.splits or ()]
                    )
                    for r in rows
                ]
            )

        reads: list[tuple[str, Callable[[Session], Any]]] = [
            ("baseline: SELECT 1", lambda s: s.execute(text("SELECT 1")).scalar_one()),
            ("page as two queries (old)", two_queries),
            ("page, planned per call (0036)", per_call_plan),
            ("history page, offset 0", lambda s: ledger.user_entries(s, user(), limit=50)),
            (
                "history page, offset 50",
                lambda s: ledger.user_entries(s, user(), limit=50, offset=50),
            ),
            ("month statistics", lambda s: ledger.statistics(s, user(), *month())),
        ]
        print(f"warming up, then {args.reps:,} reads of each, random users (interleaved) ...")
        for _, read in reads:
            time_reads("warm-up", sessions, min(args.reps, 500), read)
        timings: dict[str, list[float]] = {name: [] for name, _ in reads}
        for _ in range(3):  # interleaved rounds, so a burst of load hits every read alike
            for name, read in reads:
                timings[name] += time_reads(name, sessions, args.reps // 3, read).samples

        print("\nplans (one call each; EXPLAIN ANALYZE of each statement it ran):")
        for name, read in reads[2:]:
            print(f"  {name}:")
            explain(engine, sessions, read)

        base = Timing("baseline", timings[reads[0][0]])
        goals = {"history": 5.0, "month": 20.0}
        print(f"\n{rows:,} ledger rows, {users:,} users; {len(base.samples):,} reads each")
        print(f"| {'read':<30} | {'p50':>8} | {'p99':>8} | {'p99 / base p99':>14} | goal")
        print(f"| {'-' * 30} | {'-' * 8} | {'-' * 8} | {'-' * 14} | ----")
        for name, _ in reads:
            t = Timing(name, timings[name])
            goal = next((g for key, g in goals.items() if name.startswith(key)), None)
            verdict = (
                ""
                if goal is None
                else f"p99 < {goal:g} ms: " + ("met" if t.pct(0.99) < goal else "MISSED")
            )
            print(
                f"| {name:<30} | {t.p50:5.2f} ms | {t.pct(0.99):5.2f} ms |"
                f" {t.pct(0.99) / base.pct(0.99):13.1f}x | {verdict}"
            )
            if goal is not None:
                summary.record(
                    f"{name} p99, {rows:,} ledger rows",
                    f"p99 {t.pct(0.99):.2f} ms (p50 {t.p50:.2f})",
                    f"SELECT 1 p99 {base.pct(0.99):.2f} ms",
                    t.pct(0.99) / base.pct(0.99),
                    f"p99 < {goal:g} ms",
                    t.pct(0.99) < goal,
                )
    finally:
        engine.dispose()
        if args.keep or args.reuse:
            print(f"kept database {scratch.db_name} (drop it when done)")
            import redis

            from tests.devenv import REDIS_URL

            redis.Redis.from_url(f"{REDIS_URL}/0").delete(f"tokens-test-slot:{scratch.slot}")
        else:
            scratch.destroy()


if __name__ == "__main__":
    main()
