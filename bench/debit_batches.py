"""``debit_batch`` in debits per second: set-based (now) against item by item (before), two
concurrent batches over the same users, and pgbench's 16-client rate for the per-item statement.

    python -m bench.debit_batches [--users 100] [--items 3000] [--rounds 3] [--pgbench-seconds 10]

Domain path, no Celery: each batch is ``accounting.batches.debit_batch`` in its own transaction
(``worker.db.session_scope``), its items spread over ``--users`` users with one grant each, keys
derived from a fresh task id. "before" is ``debit_batch_item_by_item``, the code every batch ran
before (each item through ``movements.debit`` in a savepoint; SQLite still runs it).
"two concurrent" runs two processes, each sending batches of 100 covering the same 100 users, and
counts both processes' debits (processes, as two pool processes would run them).

The pgbench baseline (issue 12's goal: a batch of 1000 at >= 0.6 of it) runs, at 16 clients
(``pgbench -n -c 16 -j 2 -T 10``), one data-modifying statement per debit with the effects a
batch item has: the idempotency row (with its outcome), the guarded account update, the grant's
burn-down, the ledger entry and its split, on its own 100 users of the same database.
Rounds interleave the measures; rates are medians over rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

from bench import summary
from tests.devenv import Scratch

OPERATION = "chatgpt_message"
BIG = 10**12
SIZES = (10, 100, 1000)

PGBENCH_SCRIPT = """
\\set u random(0, {last})
\\set k random(1, 2000000000)
WITH claim AS (
    INSERT INTO idempotency_records (user_id, key, request_hash, response, created_at)
    VALUES ('pg-' || :u, 'pgb-' || :client_id || '-' || :k, 'digest',
            '{{"success": true, "amount": -1}}', clock_timestamp())
    ON CONFLICT DO NOTHING RETURNING user_id
), acct AS (
    UPDATE accounts SET tokens_balance = tokens_balance - 1, tokens_spent = tokens_spent + 1,
        updated_at = greatest(clock_timestamp(), updated_at)
    WHERE user_id = (SELECT user_id FROM claim) AND tokens_balance - tokens_reserved >= 1
    RETURNING user_id, tokens_balance, updated_at
), g AS (
    UPDATE grants SET remaining = remaining - 1, spent = spent + 1
    WHERE id = (SELECT min(id) FROM grants
                WHERE user_id = (SELECT user_id FROM acct) AND status = 'active')
    RETURNING id
), e AS (
    INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount, balance_before,
                                balance_after, idempotency_key, metadata, created_at)
    SELECT user_id, 'debit', 'chatgpt_message', -1, tokens_balance + 1, tokens_balance,
           'pgb-' || :client_id || '-' || :k, '{{}}', updated_at FROM acct
    RETURNING id
)
INSERT INTO entry_grants (entry_id, grant_id, amount, seq) SELECT e.id, g.id, -1, 0 FROM e, g;
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--items", type=int, default=3000, help="debits per measure and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pgbench-seconds", type=int, default=10)
    args = parser.parse_args()

    scratch = Scratch("tokens_bench_batches")
    scratch.export()
    scratch.create()
    try:
        _run(args.users, args.items, args.rounds, args.pgbench_seconds, scratch)
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        scratch.destroy()


def _setup(users: int) -> None:
    from accounting import accounts
    from worker.db import session_scope

    with session_scope() as s:
        for u in range(users):
            accounts.open_account(s, f"b-{u}", initial_balance=BIG)
            accounts.open_account(s, f"pg-{u}", initial_balance=BIG)


def _batches(size: int, total: int, users: int, offset: int = 0) -> list[list[Any]]:
    from models.schemas import DebitIn

    items = [
        DebitIn(user_id=f"b-{(i + offset) % users}", amount=1 + i % 7, operation_type=OPERATION)
        for i in range(max(total, size))
    ]
    return [items[i : i + size] for i in range(0, len(items), size)]


def _apply(batches: list[list[Any]], before: bool) -> None:
    from accounting.batches import debit_batch, debit_batch_item_by_item
    from worker.db import session_scope

    apply = debit_batch_item_by_item if before else debit_batch
    for batch in batches:
        with session_scope() as s:
            out = apply(s, batch, uuid.uuid4().hex)
        assert out.refused == 0, out.results[0]


def _timed(work: Callable[[], None]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def _two_worker(
    size: int, n: int, users: int, offset: int, before: bool, go: Any, done: Any
) -> None:
    """One of the two batch senders, a process of its own as a worker's pool process is."""
    batches = _batches(size, n, users, offset)
    _apply(batches[:1], before)  # connect and warm up before the start
    done.put("ready")
    go.wait()
    _apply(batches, before)
    done.put("done")


def _two(size: int, total: int, users: int, before: bool) -> float:
    """Two processes, each ``total / 2`` debits in batches of ``size`` over the same users."""
    ctx = multiprocessing.get_context("spawn")
    go, done = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_two_worker, args=(size, total // 2, users, offset, before, go, done))
        for offset in (0, users // 2)
    ]
    for p in procs:
        p.start()
    for _ in procs:
        assert done.get(timeout=120) == "ready"
    start = time.perf_counter()
    go.set()
    for _ in procs:
        assert done.get(timeout=600) == "done"
    elapsed = time.perf_counter() - start
    for p in procs:
        p.join()
    return elapsed


def _pgbench(users: int, seconds: int, scratch: Scratch) -> float:
    exe = shutil.which("pgbench")
    if exe is None:
        raise SystemExit("pgbench not found (apt-get install postgresql-client)")
    url = scratch.database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(PGBENCH_SCRIPT.format(last=users - 1))
    try:
        out = subprocess.run(
            [exe, "-n", "-c", "16", "-j", "2", "-T", str(seconds), "-f", f.name, url],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        ).stdout
    finally:
        os.unlink(f.name)
    match = re.search(r"tps = ([0-9.]+)", out)
    assert match, out
    return float(match.group(1))


def _run(users: int, total: int, rounds: int, pg_seconds: int, scratch: Scratch) -> None:
    from accounting.ledger import reconcile
    from worker.db import session_scope
    from worker.migrate import upgrade

    upgrade()
    _setup(users)
    _apply(_batches(100, 300, users), before=False)  # warm up the pool and statements
    _apply(_batches(100, 300, users), before=True)
    # Before runs fewer debits (it is ~10x slower); rates are per debit either way.
    measures: dict[str, tuple[int, Callable[[], float]]] = {}
    for before in (True, False):
        n, what = (total // 3, "before") if before else (total, "after")
        for size in SIZES:
            work = partial(_apply, _batches(size, n, users), before)
            measures[f"{what} {size}"] = (max(n, size), partial(_timed, work))
        measures[f"{what} two"] = (n, partial(_two, 100, n, users, before))
    rates: dict[str, list[float]] = {m: [] for m in measures}
    pgbench: list[float] = []
    names = list(measures)
    for r in range(rounds):
        shift = r * len(names) // rounds
        for name in names[shift:] + names[:shift]:
            n, measure = measures[name]
            rates[name].append(n / measure())
        pgbench.append(_pgbench(users, pg_seconds, scratch))

    with session_scope() as s:
        wrong = [m.user_id for m in reconcile(s).mismatches if m.user_id.startswith("b-")]
    assert wrong == [], f"grants differ from the ledger after the benchmark: {wrong[:5]}"

    rate = {m: statistics.median(v) for m, v in rates.items()}
    pg = statistics.median(pgbench)
    load = os.getloadavg()[0]
    print(
        f"debit_batch, {users} users, {total} debits per measure, {rounds} rounds, load {load:.1f}"
    )
    print(f"{'measure':52} {'debits/s':>9}   rounds")
    for m in names:
        what, of = m.split()
        label = (
            f"two concurrent batches of 100, same users ({what})"
            if of == "two"
            else f"debit_batch of {of} ({what})"
        )
        each = " ".join(f"{v:6.0f}" for v in rates[m])
        print(f"{label:52} {rate[m]:9.0f}   {each}")
    each = " ".join(f"{v:6.0f}" for v in pgbench)
    print(f"{'pgbench per-item statement, 16 clients':52} {pg:9.0f}   {each}")
    for size in SIZES:
        now, was = rate[f"after {size}"], rate[f"before {size}"]
        print(
            f"batch of {size:<4}: after/before {now / was:5.1f}x"
            f"   after/pgbench-16 {now / pg:5.2f}" + ("   (goal >= 0.60)" if size == 1000 else "")
        )
    two_before = rate["before two"] / rate["before 100"]
    two_after = rate["after two"] / rate["after 100"]
    print(
        f"two concurrent batches / one batch of 100: before {two_before:.2f}, after {two_after:.2f}"
    )
    batch = rate["after 1000"]
    summary.record(
        "debit_batch of 1000 vs pgbench, 16 clients (per-item statement)",
        f"{batch:.0f} debits/s",
        f"pgbench {pg:.0f}/s",
        batch / pg,
        ">= 0.6",
        batch / pg >= 0.6,
    )


if __name__ == "__main__":
    main()
