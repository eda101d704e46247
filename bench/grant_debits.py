"""Domain debits per second with one grant per user and with five, against v1's single-balance
debit measured in the same run (issue 11's goal: five grants cost at most 1.3x one).

    python -m bench.grant_debits [--debits 1000] [--users 100] [--rounds 3]

Each population is its own set of users in one scratch PostgreSQL database. A debit is
``accounting.movements.debit`` (with an idempotency key) in its own transaction, one thread, no
Celery, as ``bench.debits`` measures the domain path. The v1 baseline replays the v1 statement
sequence (``git show 21d2b3a~1:accounting/movements.py``) here: the idempotency claim (INSERT ...
ON CONFLICT), the guarded UPDATE of the account RETURNING it, the ledger entry, and the UPDATE of
the idempotency record with the response; it ignores grants, so its users are left out of the
final reconcile.

Five-grant users hold, in burn order: a small promo (priority 10, ends in 30 days), made afresh
before each round and sized to run out about half-way through it, then a promo (20, 60 days), two
purchases (50, one ending in 90 days, one never) and an adjustment (50, never). So most debits
touch one grant and about one in ``debits / users`` touches two. Each round runs the populations
in a rotating order; the rates are the median over rounds.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from datetime import timedelta
from functools import cache
from typing import Any

from bench import summary
from tests.devenv import Scratch

OPERATION = "chatgpt_message"
POPULATIONS = ("v1", "one", "five")
BIG = 10**9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--debits", type=int, default=1000, help="per population and round")
    parser.add_argument("--users", type=int, default=100, help="per population")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    scratch = Scratch("tokens_bench_grants")
    scratch.export()
    scratch.create()
    try:
        _run(args.debits, args.users, args.rounds)
    finally:
        from worker.db import dispose_engines

        dispose_engines()
        scratch.destroy()


def _v1_debit(session: Any, user_id: str, amount: int, key: str) -> None:
    """v1's ``movements.debit``: claim the key, one guarded UPDATE, the entry, the response."""
    from accounting import idempotency
    from accounting.catalog import known_operation
    from accounting.errors import insufficient_tokens
    from accounting.events import note_balance_change
    from accounting.movements import debit_digest
    from models.schemas import MovementOut

    known_operation(OPERATION)
    digest = debit_digest(amount, OPERATION, False, {})
    if idempotency.claim(session, user_id, key, digest) is not None:
        return  # a replay
    guarded, insert_entry = _v1_statements()
    row = session.execute(
        guarded,
        {"uid": user_id, "delta": -amount, "spent_delta": amount, "require_available": amount},
    ).first()
    if row is None:
        raise insufficient_tokens(amount, 0)
    balance, reserved, spent, now = row
    entry_id = session.execute(
        insert_entry,
        {
            "user_id": user_id,
            "kind": "debit",
            "operation_type": OPERATION,
            "tokens_amount": -amount,
            "balance_before": balance + amount,
            "balance_after": balance,
            "idempotency_key": key,
            "original_entry_id": None,
            "metadata": {},
            "created_at": now,
        },
    ).scalar_one()
    note_balance_change(
        session, user_id=user_id, balance=balance, tokens_reserved=reserved, operation="debit"
    )
    out = MovementOut(
        user_id=user_id,
        operation_type=OPERATION,
        amount=-amount,
        balance_before=balance + amount,
        new_balance=balance,
        tokens_spent=spent,
        ledger_entry_id=str(entry_id),
    )
    idempotency.record(session, user_id, key, out.model_dump(mode="json"))


@cache
def _v1_statements() -> tuple[Any, Any]:
    """v1's guarded balance UPDATE and entry INSERT, built once as v1 did."""
    from sqlalchemy import bindparam, case, insert, update

    from accounting import clock
    from models.tables import account_table, ledger_table

    a = account_table.c
    spent_after = a.tokens_spent + bindparam("spent_delta")
    guarded = (
        update(account_table)
        .where(a.user_id == bindparam("uid"))
        .where(a.tokens_balance - a.tokens_reserved >= bindparam("require_available"))
        .values(
            tokens_balance=a.tokens_balance + bindparam("delta"),
            tokens_spent=case((spent_after < 0, 0), else_=spent_after),
            updated_at=clock.stamp(a.updated_at),
        )
        .returning(a.tokens_balance, a.tokens_reserved, a.tokens_spent, a.updated_at)
    )
    return guarded, insert(ledger_table).returning(ledger_table.c.id)


def _setup(users: int) -> None:
    from accounting import accounts, movements
    from accounting.clock import db_now
    from worker.db import session_scope

    with session_scope() as s:
        now = db_now(s)
        for u in range(users):
            accounts.open_account(s, f"v1-{u}", initial_balance=BIG)
            accounts.open_account(s, f"one-{u}", initial_balance=BIG)
            user = f"five-{u}"
            accounts.open_account(s, user, initial_balance=BIG)  # adjustment, 50, never ends
            for kind, priority, days in (("promo", 20, 60), ("purchased", 50, 90)):
                movements.credit(
                    s,
                    user,
                    BIG,
                    grant_kind=kind,
                    priority=priority,
                    expires_at=now + timedelta(days=days),
                )
            movements.credit(s, user, BIG, grant_kind="purchased", priority=50)


def _top_up(users: int, size: int) -> None:
    """A fresh small first grant for each five-grant user (not timed)."""
    from accounting import movements
    from accounting.clock import db_now
    from worker.db import session_scope

    with session_scope() as s:
        ends = db_now(s) + timedelta(days=30)
        for u in range(users):
            movements.credit(s, f"five-{u}", size, grant_kind="promo", priority=10, expires_at=ends)


def _time(population: str, amounts: list[int], users: int, round_: int) -> float:
    from accounting import movements
    from worker.db import session_scope

    start = time.perf_counter()
    for i, amount in enumerate(amounts):
        user, key = f"{population}-{i % users}", f"r{round_}-{i}"
        with session_scope() as s:
            if population == "v1":
                _v1_debit(s, user, amount, key)
            else:
                movements.debit(s, user, amount, OPERATION, idempotency_key=key)
    return time.perf_counter() - start


def _splits(users: int) -> tuple[float, float, float]:
    """For the five-grant users' debits: grants touched per debit, share touching two or more,
    and the mean number of spendable grants each found (from the entries' splits)."""
    from sqlalchemy import text

    from worker.db import session_scope

    with session_scope() as s:
        touched = s.execute(
            text(
                """
                SELECT AVG(n), AVG(CASE WHEN n > 1 THEN 1.0 ELSE 0 END) FROM (
                    SELECT e.id, COUNT(eg.grant_id) AS n FROM ledger_entries e
                    JOIN entry_grants eg ON eg.entry_id = e.id
                    WHERE e.kind = 'debit' AND e.user_id LIKE 'five-%' GROUP BY e.id
                ) d
                """
            )
        ).one()
        # Spendable when each debit ran: the grants made before it that no earlier entry
        # had emptied (all five-grant grants are unheld and not yet due).
        live = s.execute(
            text(
                """
                SELECT AVG(n) FROM (
                    SELECT e.id, (
                        SELECT COUNT(*) FROM grants g
                        WHERE g.user_id = e.user_id AND g.created_at <= e.created_at
                          AND (g.ended_at IS NULL OR g.ended_at >= e.created_at)
                    ) AS n
                    FROM ledger_entries e WHERE e.kind = 'debit' AND e.user_id LIKE 'five-%'
                ) d
                """
            )
        ).scalar_one()
    return float(touched[0]), float(touched[1]), float(live)


def _run(n: int, users: int, rounds: int) -> None:
    from accounting.ledger import reconcile
    from worker.db import session_scope
    from worker.migrate import upgrade

    upgrade()
    _setup(users)
    rng = random.Random(11)
    per_user = n / users
    # The small first grant runs out about half-way through a round (mean amount 5).
    first_size = int(5 * per_user / 2)
    seconds: dict[str, list[float]] = {p: [] for p in POPULATIONS}
    _time("one", [1] * min(n, 200), users, -1)  # warm up the connection pool and statements
    for r in range(rounds):
        _top_up(users, first_size)
        amounts = [rng.randint(1, 9) for _ in range(n)]
        for p in POPULATIONS[r % 3 :] + POPULATIONS[: r % 3]:
            seconds[p].append(_time(p, amounts, users, r))

    with session_scope() as s:
        wrong = [m.user_id for m in reconcile(s).mismatches if not m.user_id.startswith("v1-")]
    assert wrong == [], f"grants differ from the ledger after the benchmark: {wrong[:5]}"
    per_debit, two, live = _splits(users)

    rate = {p: n / statistics.median(seconds[p]) for p in POPULATIONS}
    print(f"{n} debits per population and round, {rounds} rounds, {users} users each")
    print(
        f"five-grant debits: {per_debit:.2f} grants touched per debit, {two:.0%} touched two "
        f"or more, {live:.2f} grants spendable on average"
    )
    print(f"{'measure':46} {'debits/s':>10}   rounds")
    labels = {
        "v1": "v1 single-balance debit (baseline)",
        "one": "debit, one grant per user",
        "five": "debit, five grants per user",
    }
    for p in POPULATIONS:
        each = " ".join(f"{n / t:6.0f}" for t in seconds[p])
        print(f"{labels[p]:46} {rate[p]:10.0f}   {each}")
    print(f"cost five grants / one grant: {rate['one'] / rate['five']:.2f}x (goal <= 1.30x)")
    print(f"cost one grant / v1:          {rate['v1'] / rate['one']:.2f}x")
    cost = rate["one"] / rate["five"]
    summary.record(
        "debit cost, five grants per user vs one grant",
        f"five grants {rate['five']:.0f}/s",
        f"one grant {rate['one']:.0f}/s",
        cost,
        "<= 1.3x",
        cost <= 1.3,
    )


if __name__ == "__main__":
    main()
