"""Every movement on the portable Python path against its one statement alone, in the same run.

    python -m bench.movements [--seconds 5] [--runs 3] [--users 1000] [--grants 1]

For each movement, one thread for ``--seconds``, random users and fresh keys, ``--runs`` times
interleaved (medians printed):

- *before*: the domain function through ``worker.db.session_scope`` with the statements off
  (``accounting/grants.py``, several statements and round trips in a transaction);
- *after*: the same function through ``worker.db.statement_scope``, which is what its task runs:
  on PostgreSQL its one statement, alone in autocommit on a pooled driver connection.

Reserve-then-capture and reserve-then-release are measured as pairs (two movements each).
``--grants`` gives every user that many grants to burn through (five: the issue's "five grants
per user"). Creates and drops its own database; checks the ledger reconciles at the end.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench import summary
from worker.devenv import Scratch

Movement = Callable[[Any, str, str], Any]  # (session, user, key) -> result


def _movements(entries: dict[str, str]) -> dict[str, Movement]:
    from accounting import movements, reservations, statements

    def reserve_capture(s: Any, user: str, key: str) -> Any:
        held = reservations.reserve(s, user, 2, idempotency_key=f"{key}-r")
        if statements.alone(s) and s.in_transaction():
            # The hold was made in the session's transaction (reserve is not one statement):
            # the capture, alone on another connection, must see it, as a task would.
            s.commit()
        return reservations.capture(s, held.reservation_id, 1, idempotency_key=f"{key}-c")

    def reserve_release(s: Any, user: str, key: str) -> Any:
        held = reservations.reserve(s, user, 2, idempotency_key=f"{key}-r")
        return reservations.release(s, held.reservation_id, idempotency_key=f"{key}-l")

    toggle = itertools.count()
    return {
        "debit": lambda s, u, k: movements.debit(s, u, 1, "chatgpt_message", idempotency_key=k),
        "charge": lambda s, u, k: movements.charge(s, u, "chatgpt_message", idempotency_key=k),
        "credit": lambda s, u, k: movements.credit(s, u, 1, "purchase", idempotency_key=k),
        "refund": lambda s, u, k: movements.refund(
            s, u, 1, original_entry_id=entries[u], idempotency_key=k
        ),
        "reset_balance": lambda s, u, k: movements.reset_balance(
            s, u, 10**12 + next(toggle) % 2, idempotency_key=k
        ),
        "reserve + capture": reserve_capture,
        "reserve + release": reserve_release,
    }


def _rate(seconds: float, work: Callable[[int], None]) -> float:
    stop = time.perf_counter() + seconds
    started = time.perf_counter()
    i = 0
    while time.perf_counter() < stop:
        work(i)
        i += 1
    return i / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--grants", type=int, default=1)
    args = parser.parse_args()
    scratch = Scratch("tokens_bench_movements")
    scratch.export()
    scratch.create()
    try:
        _run(args)
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        scratch.destroy()


def _run(args: argparse.Namespace) -> None:
    from accounting import accounts, movements, statements
    from accounting.ledger import reconcile
    from worker.db import session_scope, statement_scope
    from worker.migrate import upgrade

    upgrade()
    users = [f"user-{u}" for u in range(args.users)]
    entries: dict[str, str] = {}
    with session_scope() as s:
        for u in users:
            accounts.open_account(s, u, initial_balance=0)
            for g in range(args.grants):
                movements.credit(s, u, 10**12 // args.grants, "purchase", priority=10 + g)
            # Something to refund against, never refunded in full.
            entries[u] = movements.debit(s, u, 10**9, "chatgpt_message").ledger_entry_id
    tag = uuid.uuid4().hex[:6]
    table = _movements(entries)

    def measure(name: str, after: bool) -> float:
        move = table[name]
        scope = statement_scope if after else session_scope

        def work(i: int) -> None:
            statements.ENABLED = after
            with scope() as s:
                move(s, users[i % len(users)], f"{tag}-{name}-{after}-{i}")

        try:
            return _rate(args.seconds, work)
        finally:
            statements.ENABLED = True

    rates: dict[tuple[str, bool], list[float]] = {}
    for run in range(args.runs):
        for name in table:
            for after in (run % 2 == 0, run % 2 == 1):  # alternate which goes first
                rates.setdefault((name, after), []).append(measure(name, after))
        tag = uuid.uuid4().hex[:6]

    with session_scope() as s:
        assert reconcile(s).mismatches == [], "balance differs from ledger after the benchmark"
    print(
        f"{args.seconds:g}s each, median of {args.runs} interleaved runs, {args.users} users, "
        f"{args.grants} grant(s) each; load {os.getloadavg()[0]:.2f}"
    )
    print(f"| {'movement':18} | {'Python path':>12} | {'alone':>12} | {'after / before':>14} |")
    print(f"| {'-' * 18} | {'-' * 12} | {'-' * 12} | {'-' * 14} |")
    for name in table:
        old, new = (statistics.median(rates[(name, alone)]) for alone in (False, True))
        print(f"| {name:18} | {old:10.0f}/s | {new:10.0f}/s | {new / old:13.2f}x |")
        summary.record(
            f"{name}: one statement alone vs the Python path (in-process)",
            f"{new:.0f}/s",
            f"Python path {old:.0f}/s",
            new / old,
            "(no goal)",
            None,
        )


if __name__ == "__main__":
    main()
