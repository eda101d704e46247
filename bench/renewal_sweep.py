"""Benchmark: the renewal sweep against the best single SQL statement, on N due accounts.

    python -m bench.renewal_sweep              # 1,000,000 accounts
    python -m bench.renewal_sweep --users 50000

Creates its own PostgreSQL database (dropped at the end unless ``--keep``), fills it with due
accounts via ``generate_series``, then, from the same starting data each time, times:

1. the project's sweep (``accounting.renewals.sweep``: chunked, keyset-paged, one statement and
   one commit per chunk, bounded memory);
2. one set-based statement renewing everyone at once (UPDATE ... RETURNING feeding an INSERT of
   the ledger entries, one transaction);
3. optionally (``--per-user N``) the one-user-at-a-time design on a sample, extrapolated.

After each it checks: every account renewed once, one ``monthly_reset`` entry per account, and
every balance equal to the sum of its ledger.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from accounting import renewals
from worker.db import make_engine
from worker.devenv import PG_ADMIN_URL
from worker.migrate import upgrade

ADMIN_URL = PG_ADMIN_URL  # $TOKENS_TEST_PG, else the local server as postgres
NOW = datetime(2026, 11, 24, 2, 0, 1, tzinfo=UTC)

# A tenth never renewed, the rest renewed 30..59 days before NOW at any time of day; tiers mixed
# (6 Gift : 3 Professional : 1 Business); a third of the paid users with a future expiry.
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

SINGLE_STATEMENT_SQL = f"""
WITH {renewals._TIERS},
renewed AS (
    UPDATE accounts a
    SET tokens_balance = a.tokens_balance + t.allocation, last_renewal_at = :now, updated_at = :now
    FROM tiers t
    WHERE a.tier = t.tier AND {renewals._GUARD}
    RETURNING a.user_id, a.tier, a.tokens_balance, t.allocation
)
INSERT INTO ledger_entries
    (user_id, kind, operation_type, tokens_amount, balance_before, balance_after, metadata,
     created_at)
SELECT user_id, :kind, :operation, allocation, tokens_balance - allocation, tokens_balance,
       jsonb_build_object('tier', tier, 'source', CAST(:source AS text)), :now
FROM renewed
"""


@dataclass
class Run:
    name: str
    seconds: float
    users: int

    @property
    def rate(self) -> float:
        return self.users / self.seconds


def create_database(name: str) -> str:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


def drop_database(name: str) -> None:
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def maintain(engine: Engine, *tables: str) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        for table in tables:
            conn.execute(text(f"VACUUM ANALYZE {table}"))
        conn.execute(text("CHECKPOINT"))


def seed(engine: Engine, users: int) -> None:
    with engine.begin() as conn:
        conn.execute(text(SEED_SQL), {"now": NOW, "users": users})
        conn.execute(text("CREATE TABLE accounts_seed AS SELECT * FROM accounts"))
    maintain(engine, "accounts", "accounts_seed")


def reset(engine: Engine) -> None:
    """Back to the seeded state: every account due, no ledger entry."""
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE ledger_entries, accounts RESTART IDENTITY CASCADE"))
        conn.execute(text("INSERT INTO accounts SELECT * FROM accounts_seed"))
    maintain(engine, "accounts", "ledger_entries")


def check(engine: Engine, users: int) -> None:
    with engine.connect() as conn:
        renewed = conn.execute(
            text("SELECT count(*) FROM accounts WHERE last_renewal_at = :now"), {"now": NOW}
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


def timed(name: str, users: int, action: Callable[[], None]) -> Run:
    started = time.perf_counter()
    action()
    run = Run(name, time.perf_counter() - started, users)
    print(f"  {name}: {run.seconds:.2f} s, {run.rate:,.0f} users/s")
    return run


def run_sweep(sessions: sessionmaker[Session], users: int, chunk_size: int | None) -> None:
    out = renewals.sweep(sessions, now=NOW, chunk_size=chunk_size)
    if out.successful != users or out.failed or out.skipped:
        raise SystemExit(f"sweep renewed {out.successful} of {users}: {out}")


def run_single_statement(engine: Engine) -> None:
    params = renewals._params(renewals.plans_at(NOW), NOW)
    with engine.begin() as conn:
        conn.execute(text(SINGLE_STATEMENT_SQL), params)


def run_per_user(sessions: sessionmaker[Session], sample: int) -> None:
    """The seed's design: load the users, then check and renew each in its own transaction."""
    with sessions() as session:
        user_ids = list(
            session.execute(
                text("SELECT user_id FROM accounts ORDER BY user_id LIMIT :n"), {"n": sample}
            ).scalars()
        )
    for user_id in user_ids:
        with sessions() as session, session.begin():
            if renewals.check_eligibility(session, user_id, NOW).eligible:
                renewals.renew_user(session, user_id, NOW)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--chunk-size", type=int, default=None, help="default: settings")
    parser.add_argument(
        "--per-user",
        type=int,
        default=0,
        metavar="N",
        help="also time the one-user-per-transaction design on N users and extrapolate",
    )
    parser.add_argument("--keep", action="store_true", help="keep the benchmark database")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each sweep chunk")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(message)s",
        stream=sys.stdout,
    )

    name = f"tokens_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    url = create_database(name)
    engine = make_engine(url)
    sessions = sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    try:
        print(f"database {name}: migrating, seeding {args.users:,} due accounts ...")
        upgrade(url)
        started = time.perf_counter()
        seed(engine, args.users)
        print(f"  seeded in {time.perf_counter() - started:.1f} s")

        print("1. the sweep (accounting.renewals.sweep)")
        reset(engine)
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sweep = timed("sweep", args.users, lambda: run_sweep(sessions, args.users, args.chunk_size))
        rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(
            f"  peak RSS of this process: {rss_before / 1024:.0f} MiB before, "
            f"{rss_after / 1024:.0f} MiB after"
        )
        check(engine, args.users)

        print("2. one set-based statement (UPDATE ... RETURNING -> INSERT, one transaction)")
        reset(engine)
        single = timed("single statement", args.users, lambda: run_single_statement(engine))
        check(engine, args.users)

        per_user = None
        if args.per_user:
            sample = min(args.per_user, args.users)
            print(f"3. one user per transaction, {sample:,} users (the seed's design)")
            reset(engine)
            per_user = timed("per user", sample, lambda: run_per_user(sessions, sample))

        print()
        print(f"users:            {args.users:,}")
        print(f"sweep:            {sweep.seconds:8.2f} s  {sweep.rate:>12,.0f} users/s")
        print(f"single statement: {single.seconds:8.2f} s  {single.rate:>12,.0f} users/s")
        print(f"ratio sweep / single statement: {sweep.seconds / single.seconds:.2f}x")
        if per_user is not None:
            estimate = args.users / per_user.rate
            print(
                f"one user per transaction: {per_user.rate:,.0f} users/s, so ~{estimate:,.0f} s for"
                f" {args.users:,} (extrapolated): {estimate / sweep.seconds:,.0f}x the sweep"
            )
    finally:
        engine.dispose()
        if args.keep:
            print(f"kept database {name}")
        else:
            drop_database(name)


if __name__ == "__main__":
    main()
