"""accounting/batches.py over a real PostgreSQL session, concurrent batches included."""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from accounting import accounts, batches, movements
from models.schemas import DebitBatchOut, DebitIn, Failure, MovementOut
from models.tables import IdempotencyRecord, LedgerEntry
from tests.support import assert_ledger_consistent, run_in_threads
from worker.db import session_scope

THREADS = 6  # the engine's pool holds 7 connections; the race needs each thread on its own


def d(user_id: str, amount: int, operation_type: str = "image_generation", **kw: Any) -> DebitIn:
    return DebitIn(user_id=user_id, amount=amount, operation_type=operation_type, **kw)


def opened(session: Session, **balances: int) -> None:
    for user_id, balance in balances.items():
        accounts.open_account(session, user_id, initial_balance=balance)
    session.commit()


def balances(session: Session, *user_ids: str) -> list[int]:
    return [accounts.get_balance(session, u).tokens_balance for u in user_ids]


def counts(session: Session) -> tuple[int, int]:
    """(ledger entries, idempotency records)."""
    entries = session.scalar(select(func.count()).select_from(LedgerEntry))
    records = session.scalar(select(func.count()).select_from(IdempotencyRecord))
    return int(entries or 0), int(records or 0)


def refusal(code: str, error: str) -> Failure:
    return Failure(error=error, error_code=code)


def test_mixed_outcomes_come_back_in_the_order_sent(session: Session) -> None:
    opened(session, u1=100, u2=50)
    out = batches.debit_batch(
        session,
        [
            d("u2", 30),
            d("u1", 200),
            d("ghost", 1),
            d("u1", 0),
            d("u1", 5, "no_such_operation"),
            d("u1", 40, metadata={"job": "j1"}),
            d("u2", 30),
            d("u1", 100, allow_overdraft=True),
        ],
        "t1",
    )
    session.commit()
    r = out.results
    assert isinstance(r[0], MovementOut) and isinstance(r[5], MovementOut)
    assert isinstance(r[7], MovementOut)
    assert (r[0].user_id, r[0].amount, r[0].balance_before, r[0].new_balance) == ("u2", -30, 50, 20)
    assert r[1:5] == [
        refusal("INSUFFICIENT_TOKENS", "Insufficient tokens. Required: 200, Available: 100"),
        refusal("USER_NOT_FOUND", "User not found"),
        refusal("INVALID_AMOUNT", "Debit amount must be positive"),
        refusal("UNKNOWN_OPERATION_TYPE", "Unknown operation type: no_such_operation"),
    ]
    assert (r[5].user_id, r[5].balance_before, r[5].new_balance, r[5].tokens_spent) == (
        "u1",
        100,
        60,
        40,
    )
    assert r[6] == refusal(
        "INSUFFICIENT_TOKENS", "Insufficient tokens. Required: 30, Available: 20"
    )
    assert (r[7].balance_before, r[7].new_balance, r[7].replayed) == (60, -40, False)
    assert (out.applied, out.refused) == (3, 5)
    assert balances(session, "u1", "u2") == [-40, 20]
    entry = session.get(LedgerEntry, int(r[5].ledger_entry_id))
    assert entry is not None
    assert (entry.meta, entry.idempotency_key) == ({"job": "j1"}, "t1:5")
    assert_ledger_consistent(session)


def test_a_refused_item_leaves_no_trace_and_keeps_the_others(session: Session) -> None:
    opened(session, u1=100)
    before = counts(session)
    out = batches.debit_batch(
        session,
        [d("u1", 60, idempotency_key="a"), d("u1", 60, idempotency_key="b"), d("u1", 40)],
        "t1",
    )
    session.commit()
    assert [r.success for r in out.results] == [True, False, True]
    assert balances(session, "u1") == [0]
    assert counts(session) == (before[0] + 2, before[1] + 2)
    keys = set(session.scalars(select(IdempotencyRecord.key)))
    assert keys == {"a", "t1:2"}  # the refused "b" was rolled back with its savepoint
    # So "b" is free: asked again once tokens are there, it applies.
    movements.credit(session, "u1", 60, "purchase")
    again = batches.debit_batch(session, [d("u1", 60, idempotency_key="b")], "t2")
    session.commit()
    assert isinstance(again.results[0], MovementOut) and not again.results[0].replayed
    assert_ledger_consistent(session)


def test_a_redelivered_batch_replays_every_item(session: Session) -> None:
    opened(session, u1=100, u2=100)
    items = [d("u1", 10), d("u2", 500), d("u2", 20), d("u1", 10, idempotency_key="own")]
    first = batches.debit_batch(session, items, "t1")
    session.commit()
    before = (counts(session), balances(session, "u1", "u2"))

    second = batches.debit_batch(session, items, "t1")
    session.commit()
    assert (counts(session), balances(session, "u1", "u2")) == before
    # A refusal left no trace, so it is tried again (as tokens.debit does), now against 80.
    assert second.results[1] == refusal(
        "INSUFFICIENT_TOKENS", "Insufficient tokens. Required: 500, Available: 80"
    )
    for was, now in zip(first.results, second.results, strict=True):
        if isinstance(was, MovementOut):
            assert now == was.model_copy(update={"replayed": True})
    assert (second.applied, second.refused) == (3, 1)

    # Another message with the same items is another request: the derived keys differ.
    third = batches.debit_batch(session, items[:1], "t2")
    session.commit()
    assert isinstance(third.results[0], MovementOut) and not third.results[0].replayed
    assert balances(session, "u1", "u2") == [70, 80]
    assert_ledger_consistent(session)


def test_an_item_key_used_by_an_earlier_single_debit(session: Session) -> None:
    opened(session, u1=100)
    single = movements.debit(session, "u1", 10, "image_generation", idempotency_key="k1")
    session.commit()
    out = batches.debit_batch(
        session,
        [d("u1", 20, idempotency_key="k1"), d("u1", 10, idempotency_key="k1")],
        "t1",
    )
    session.commit()
    assert out.results == [
        refusal("IDEMPOTENCY_CONFLICT", "Idempotency key reused with different parameters"),
        single.model_copy(update={"replayed": True}),
    ]
    assert (out.applied, out.refused) == (1, 1)
    assert balances(session, "u1") == [90]
    assert_ledger_consistent(session)


def test_a_thousand_items(session: Session) -> None:
    users = [f"u{i}" for i in range(10)]
    opened(session, **dict.fromkeys(users, 10_000))
    items = [d(users[i % 10], 1 + i % 7, "chatgpt_message") for i in range(1000)]
    out = batches.debit_batch(session, items, "t1")
    session.commit()
    assert (out.applied, out.refused) == (1000, 0)
    assert [r.user_id for r in out.results if isinstance(r, MovementOut)] == [
        i.user_id for i in items
    ]
    for u in users:
        asked = sum(i.amount for i in items if i.user_id == u)
        assert balances(session, u) == [10_000 - asked]
    assert counts(session) == (10 + 1000, 1000)
    assert_ledger_consistent(session)


def test_concurrent_batches_in_different_orders_neither_deadlock_nor_overspend(
    session: Session,
) -> None:
    # Each batch touches the same four accounts in its own shuffled order. Locking rows in the
    # order items come would let two batches each hold a row the other waits for (PostgreSQL
    # then aborts one with a deadlock, which surfaces here as an exception).
    users = ["a", "b", "c", "d"]
    opened(session, **dict.fromkeys(users, 500))
    # 6 threads x 3 batches x 60 debits of 5 on 4 x 500 tokens: exactly 400 can succeed.

    def work(i: int) -> list[DebitBatchOut]:
        rng = random.Random(i)
        outs = []
        for round_ in range(3):
            items = [d(users[j % 4], 5) for j in range(60)]
            rng.shuffle(items)
            with session_scope() as s:
                outs.append(batches.debit_batch(s, items, f"t{i}-{round_}"))
        return outs

    outs = [o for batch in run_in_threads(THREADS, work) for o in batch]
    results = [r for o in outs for r in o.results]
    ok = [r for r in results if isinstance(r, MovementOut)]
    assert len(ok) == 400
    assert {r.error_code for r in results if isinstance(r, Failure)} == {"INSUFFICIENT_TOKENS"}
    for u in users:
        assert sorted(r.new_balance for r in ok if r.user_id == u) == list(range(0, 500, 5))
    assert balances(session, *users) == [0, 0, 0, 0]
    assert_ledger_consistent(session)


def test_a_batch_and_single_debits_sharing_keys_never_deadlock(session: Session) -> None:
    """The confirmed defect: a batch locked its accounts and then claimed keys, a single debit
    claimed its key and then updated the account, so two movements sharing a (user, key) pair
    each held what the other waited for (54 of 60 runs ended in a deadlock, retried)."""
    rounds, keys = 15, 5
    opened(session, u=10_000, v=10_000)

    def work(i: int) -> list[BaseException]:
        failures: list[BaseException] = []
        for r in range(rounds):
            try:
                with session_scope() as s:
                    if i == 0:
                        items = [
                            d(u, 1, idempotency_key=f"r{r}-k{k}")
                            for k in range(keys)
                            for u in ("v", "u")
                        ]
                        batches.debit_batch(s, items, f"batch-{r}")
                    else:
                        movements.debit(
                            s, "u", 1, "image_generation", idempotency_key=f"r{r}-k{i - 1}"
                        )
            except DBAPIError as exc:  # a deadlock PostgreSQL broke by aborting one of them
                failures.append(exc)
        return failures

    failures = [f for per_thread in run_in_threads(keys + 1, work) for f in per_thread]
    assert failures == []
    # Every (user, key) applied once, whoever got there first.
    assert counts(session) == (2 + rounds * keys * 2, rounds * keys * 2)
    assert balances(session, "u", "v") == [10_000 - rounds * keys] * 2
    assert_ledger_consistent(session)


# --- the set-based path gives what the item-by-item path gives ---------------------------------


def _state(session: Session, out: DebitBatchOut) -> dict[str, Any]:
    """Everything a batch changed, with ledger ids as (user, the entry's rank among the user's)
    (ids and clocks differ between two runs of the same batch, and the order across users)."""
    from sqlalchemy import text

    rank: dict[str, tuple[str, int]] = {}
    for i, user_id in session.execute(text("SELECT id, user_id FROM ledger_entries ORDER BY id")):
        rank[str(i)] = (user_id, sum(r[0] == user_id for r in rank.values()))

    def norm(r: MovementOut | Failure) -> Any:
        if isinstance(r, MovementOut):
            return r.model_copy(update={"ledger_entry_id": rank[r.ledger_entry_id]})
        return r

    def rows(sql: str) -> list[Any]:
        return [tuple(r) for r in session.execute(text(sql))]

    records = [
        (u, k, h, None if r is None else {**r, "ledger_entry_id": rank[r["ledger_entry_id"]]})
        for u, k, h, r in rows(
            "SELECT user_id, key, request_hash, response FROM idempotency_records ORDER BY 1, 2"
        )
    ]
    events = session.info.get("pending_domain_events", [])
    return {
        "results": [norm(r) for r in out.results],
        "counts": (out.applied, out.refused),
        "accounts": rows(
            "SELECT user_id, tokens_balance, tokens_reserved, tokens_spent, debt FROM accounts"
            " ORDER BY 1"
        ),
        "grants": rows(
            "SELECT id, remaining, held, spent, expired, status, ended_at IS NULL FROM grants"
            " ORDER BY 1"
        ),
        # Per user in the order applied (a batch may apply users in another order).
        "entries": rows(
            "SELECT user_id, kind, operation_type, tokens_amount, balance_before, balance_after,"
            " idempotency_key, metadata::text FROM ledger_entries ORDER BY user_id, id"
        ),
        "splits": sorted(
            (rank[str(e)], g, a, s)
            for e, g, a, s in rows("SELECT entry_id, grant_id, amount, seq FROM entry_grants")
        ),
        "records": records,
        "events": sorted(repr(sorted(f.items())) for _, _, f in events),
    }


def test_set_based_and_item_by_item_agree(session: Session) -> None:
    from datetime import timedelta

    from accounting import clock, reservations
    from tests.accounting.grant_helpers import credited, make_due

    users = [f"g{i}" for i in range(6)]
    opened(session, **dict.fromkeys(users, 0))
    later = clock.db_now(session) + timedelta(days=3)
    for i, u in enumerate(users):
        credited(session, 40 + 10 * i, u, kind="promo", priority=5, expires_at=later)
        credited(session, 30, u, kind="promo", expires_at=later + timedelta(days=i))
        credited(session, 25 + i, u)
    due = credited(session, 15, "g1", kind="promo", expires_at=later)
    make_due(session, due)
    reservations.reserve(session, "g2", 50)
    movements.debit(session, "g3", 200, "image_generation", allow_overdraft=True)
    movements.debit(session, "g4", 7, "image_generation", idempotency_key="old")
    movements.debit(session, "g5", 7, "image_generation", idempotency_key="old")
    session.commit()

    rng = random.Random(12)
    items = [
        d(
            rng.choice([*users, "ghost"]),
            rng.choice([0, 1, 5, 20, 45, 90]),
            rng.choice(["image_generation", "chatgpt_message"] * 5 + ["nope"]),
            allow_overdraft=rng.random() < 0.2,
            metadata={"n": n} if n % 3 else {},
            idempotency_key=rng.choice([None, None, f"k{n}"]),
        )
        for n in range(120)
    ]
    items.append(d("g4", 7, idempotency_key="old"))  # a replay of the earlier debit
    items.append(d("g5", 8, idempotency_key="old"))  # a conflict with it
    items.append(d("g5", 3, idempotency_key="k1"))  # another user's key: not the same key
    items += [d("g0", 3, idempotency_key="twice"), d("g0", 3, idempotency_key="twice")]

    states = []
    for apply in (batches.debit_batch, batches.debit_batch_item_by_item):
        out = apply(session, items, "t1")
        session.flush()
        states.append(_state(session, out))
        assert_ledger_consistent(session)
        session.rollback()
    set_based, item_by_item = states
    for part in item_by_item:
        assert set_based[part] == item_by_item[part], part
    kinds = {type(r).__name__ for r in item_by_item["results"]}
    assert kinds == {"MovementOut", "Failure"}
    codes = {r.error_code for r in item_by_item["results"] if isinstance(r, Failure)}
    assert codes == {
        "INVALID_AMOUNT",
        "UNKNOWN_OPERATION_TYPE",
        "USER_NOT_FOUND",
        "INSUFFICIENT_TOKENS",
        "IDEMPOTENCY_CONFLICT",
    }
    assert any(r.replayed for r in item_by_item["results"] if isinstance(r, MovementOut))
