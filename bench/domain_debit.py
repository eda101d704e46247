"""The domain debit in-process against pgbench running the same statement, in the same run.

    python -m bench.domain_debit [--seconds 10] [--users 1000] [--hot-clients 16] [--runs 3]
                                 [--months N]   # N monthly partitions made first

Measures, each for ``--seconds`` and ``--runs`` times interleaved (medians printed):

- ``movements.debit`` through ``worker.db.session_scope``: the one statement ``tokens_spend()``
  in a transaction, then through ``worker.db.statement_scope``: the statement alone in
  autocommit on a pooled driver connection (what ``tokens.debit`` runs), one thread, random
  users and fresh keys;
- the same statement on a bare pooled connection (no Session): the floor of the Python side,
  from worker.db's engine (a ping only after a second idle) and from one with ``pool_pre_ping``
  (a ping on every checkout, as before);
- ``pgbench -n -M prepared -f debit.sql -c 1`` running that statement with random users and keys;
- one hot account: 16 threads debiting it in-process, against ``pgbench -c 16`` on it.

Ratios are against pgbench of the same shape. pgbench runs each statement in autocommit (one
round trip); a transaction from Python adds ``BEGIN`` and ``COMMIT`` (psycopg sends each on its
own), so a pgbench script with those two is printed too. Creates and drops its own database.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from bench import summary
from tests.devenv import Scratch

PGBENCH = os.environ.get("PGBENCH", "/usr/bin/pgbench")
STATEMENT = (
    "SELECT status FROM tokens_spend({user}, 'pgb-' || :client_id || '-' || :k,"
    " 'digest', 'debit', 'chatgpt_message', 1, false, '{}');"
)


def _pgbench(url: str, script: str, clients: int, seconds: int) -> float:
    """Transactions per second pgbench reports for ``script``."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    try:
        dsn = url.replace("postgresql+psycopg://", "postgresql://")
        command = [PGBENCH, "-n", "-M", "prepared", "-f", f.name, "-c", str(clients)]
        command += ["-j", str(min(clients, 2)), "-T", str(seconds), dsn]
        out = subprocess.run(
            command,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        Path(f.name).unlink()
    found = re.search(r"tps = ([0-9.]+)", out)
    if found is None:
        raise SystemExit(f"pgbench printed no rate:\n{out}")
    return float(found.group(1))


def _script(users: int, transaction: bool, hot: bool = False) -> str:
    lines = [f"\\set u random(0, {users - 1})", "\\set k random(1, 9000000000000000)"]
    statement = STATEMENT.replace("{user}", "'hot'" if hot else "'user-' || :u")
    body = [statement] if not transaction else ["BEGIN;", statement, "COMMIT;"]
    return "\n".join(lines + body) + "\n"


def _for(seconds: float, threads: int, work: Callable[[int, int], None]) -> float:
    """Run ``work(thread, i)`` in ``threads`` threads for ``seconds``; returns calls per second."""
    stop = time.perf_counter() + seconds
    counts = [0] * threads

    def loop(t: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            work(t, i)
            i += 1
        counts[t] = i

    start = time.perf_counter()
    pool = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--hot-clients", type=int, default=16)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--months",
        type=int,
        default=None,
        help="the ledger's monthly partitions made N months ahead first: as many as a ledger"
        " that has run N months holds",
    )
    args = parser.parse_args()

    scratch = Scratch("tokens_bench_debit")
    scratch.export()
    os.environ["TOKENS_DB_POOL_SIZE"] = str(args.hot_clients + 2)
    scratch.create()
    try:
        _run(
            scratch.database_url, args.seconds, args.users, args.hot_clients, args.runs, args.months
        )
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        scratch.destroy()


def _run(
    url: str, seconds: int, users: int, hot_clients: int, runs: int, months: int | None
) -> None:
    from sqlalchemy import Engine, create_engine, text

    from accounting import accounts, movements
    from worker.db import get_engine, session_scope, statement_scope
    from worker.migrate import upgrade

    upgrade()
    with session_scope() as s:
        if months is not None:
            from accounting.months import make_months

            print(f"ledger months made: {len(make_months(s, months))}")
        for u in range(users):
            accounts.open_account(s, f"user-{u}", initial_balance=10**12)
        accounts.open_account(s, "hot", initial_balance=10**12)
    tag = uuid.uuid4().hex[:6]

    def debit(user: Callable[[int], str], alone: bool = False) -> Callable[[int, int], None]:
        scope = statement_scope if alone else session_scope

        def work(t: int, i: int) -> None:
            with scope() as s:
                movements.debit(
                    s, user(i), 1, "chatgpt_message", idempotency_key=f"{tag}-{t}-{i}-{alone}"
                )

        return work

    call = text(
        "SELECT status FROM tokens_spend(:u, :k, 'digest', 'debit', 'chatgpt_message', 1,"
        " false, '{}')"
    )

    pre_ping = create_engine(url, pool_size=2, pool_pre_ping=True)

    def bare(engine: Engine) -> Callable[[int, int], None]:
        def work(t: int, i: int) -> None:
            with engine.begin() as conn:
                conn.execute(call, {"u": f"user-{i % users}", "k": f"{tag}-b{id(engine)}-{t}-{i}"})

        return work

    spread = lambda i: f"user-{i % users}"  # noqa: E731
    measures: dict[str, Callable[[], float]] = {
        "statement": lambda: _for(seconds, 1, debit(spread)),
        "alone": lambda: _for(seconds, 1, debit(spread, alone=True)),
        "bare": lambda: _for(seconds, 1, bare(get_engine())),
        "bare_pre_ping": lambda: _for(seconds, 1, bare(pre_ping)),
        "pgbench": lambda: _pgbench(url, _script(users, False), 1, seconds),
        "pgbench_tx": lambda: _pgbench(url, _script(users, True), 1, seconds),
        "hot_statement": lambda: _for(seconds, hot_clients, debit(lambda i: "hot")),
        "hot_alone": lambda: _for(seconds, hot_clients, debit(lambda i: "hot", alone=True)),
        "hot_pgbench": lambda: _pgbench(url, _script(users, False, hot=True), hot_clients, seconds),
    }
    rates: dict[str, list[float]] = {name: [] for name in measures}
    for _ in range(runs):
        for name, measure in measures.items():
            rates[name].append(measure())
    m = {name: statistics.median(r) for name, r in rates.items()}

    with session_scope() as s:
        from accounting.ledger import reconcile

        assert reconcile(s).mismatches == [], "balance differs from ledger after the benchmark"
        n = s.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one()

    print(f"{seconds}s each, median of {runs} interleaved runs, {users} users, {n} entries at end")
    print(f"{'measure':58} {'rate':>9} {'ratio':>7}   (runs' min-max)")
    rows = [
        ("pgbench -c 1: SELECT tokens_spend(...) (baseline)", "pgbench", "pgbench"),
        ("pgbench -c 1: BEGIN; SELECT tokens_spend(...); COMMIT", "pgbench_tx", "pgbench"),
        ("domain debit, one statement in a transaction, session_scope", "statement", "pgbench"),
        ("domain debit, the statement alone, statement_scope", "alone", "pgbench"),
        ("  the statement on a pooled Connection, no Session", "bare", "pgbench"),
        ("  the same, pool_pre_ping=True (a ping per checkout)", "bare_pre_ping", "pgbench"),
        (f"pgbench -c {hot_clients}, one hot account (baseline)", "hot_pgbench", "hot_pgbench"),
        (f"hot account, {hot_clients} threads, one statement", "hot_statement", "hot_pgbench"),
        (f"hot account, {hot_clients} threads, the statement alone", "hot_alone", "hot_pgbench"),
    ]
    for label, name, base in rows:
        low, high = min(rates[name]), max(rates[name])
        ratio = m[name] / m[base]
        print(f"{label:58} {m[name]:8.0f}/s {ratio:7.2f}   ({low:.0f}-{high:.0f})")
    print(
        f"one statement vs pgbench BEGIN/SELECT/COMMIT (the same round trips): "
        f"{m['statement'] / m['pgbench_tx']:.2f}"
    )
    alone = m["alone"] / m["pgbench"]
    summary.record(
        "domain debit (statement alone) vs pgbench -c 1",
        f"{m['alone']:.0f}/s",
        f"pgbench {m['pgbench']:.0f}/s",
        alone,
        ">= 0.7",
        alone >= 0.7,
    )
    hot = m["hot_alone"] / m["hot_pgbench"]
    summary.record(
        f"hot account, {hot_clients} producers (statement alone) vs pgbench -c {hot_clients}",
        f"{m['hot_alone']:.0f}/s",
        f"pgbench {m['hot_pgbench']:.0f}/s",
        hot,
        ">= 0.5",
        hot >= 0.5,
    )


if __name__ == "__main__":
    main()
