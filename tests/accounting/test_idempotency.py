"""accounting/idempotency.py: keys claimed in the transaction of their effect, over PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from accounting import accounts, idempotency, ledger, movements
from accounting.errors import DomainError
from models.schemas import MovementOut
from models.tables import IdempotencyRecord, LedgerEntry
from tests.support import assert_ledger_consistent, attempt, refused, run_in_threads
from worker.db import session_factory

THREADS = 6
CONFLICT = ("IDEMPOTENCY_CONFLICT", "Idempotency key reused with different parameters")


def opened(session: Session, user_id: str = "u1", balance: int = 100) -> None:
    accounts.open_account(session, user_id, initial_balance=balance)
    session.commit()


def counts(session: Session) -> tuple[int, int, int]:
    """(balance of u1, ledger entries, idempotency records)."""
    return (
        accounts.get_balance(session, "u1").tokens_balance,
        int(session.scalar(select(func.count()).select_from(LedgerEntry)) or 0),
        int(session.scalar(select(func.count()).select_from(IdempotencyRecord)) or 0),
    )


# --- the module itself -----------------------------------------------------------------------


def test_request_hash_depends_on_what_is_asked_not_on_key_order() -> None:
    a = idempotency.request_hash("debit", amount=10, metadata={"a": 1, "b": 2})
    assert a == idempotency.request_hash("debit", metadata={"b": 2, "a": 1}, amount=10)
    assert len(a) == 64
    assert a != idempotency.request_hash("debit", amount=11, metadata={"a": 1, "b": 2})
    assert a != idempotency.request_hash("credit", amount=10, metadata={"a": 1, "b": 2})
    assert a != idempotency.request_hash("debit", amount=10, metadata={"a": 1})


def test_claim_then_record_then_replay(session: Session) -> None:
    digest = idempotency.request_hash("op", x=1)
    assert idempotency.claim(session, "u1", "k", digest) is None
    idempotency.record(session, "u1", "k", {"done": True})
    session.commit()
    assert idempotency.claim(session, "u1", "k", digest) == {"done": True}
    err = refused(session, idempotency.claim, "u1", "k", idempotency.request_hash("op", x=2))
    assert (err.code, err.message) == CONFLICT
    # Another user's "k" is another key.
    assert idempotency.claim(session, "u2", "k", idempotency.request_hash("op", x=2)) is None


def test_no_key_claims_nothing(session: Session) -> None:
    assert idempotency.claim(session, "u1", None, "d") is None
    idempotency.record(session, "u1", None, {"done": True})
    session.commit()
    assert session.scalar(select(func.count()).select_from(IdempotencyRecord)) == 0


# --- through the movements --------------------------------------------------------------------

Movement = Callable[..., MovementOut]

SAME_REQUESTS: list[tuple[Movement, tuple[Any, ...], dict[str, Any]]] = [
    (movements.debit, (30, "image_generation"), {"metadata": {"job": 1}}),
    (movements.credit, (30,), {"operation_type": "purchase"}),
    (movements.charge, ("sora_image",), {}),
    (movements.refund, (30,), {"reason": "sorry"}),
    (movements.reset_balance, (42,), {"reason": "support"}),
]


@pytest.mark.parametrize(
    ("action", "args", "kwargs"), SAME_REQUESTS, ids=[a.__name__ for a, _, _ in SAME_REQUESTS]
)
def test_same_key_same_request_replays_the_first_result(
    session: Session, action: Movement, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    opened(session)
    first = action(session, "u1", *args, idempotency_key="k1", **kwargs)
    session.commit()
    after_first = counts(session)
    # Whatever happened since, the replay returns the first outcome and writes nothing.
    movements.credit(session, "u1", 1000)
    session.commit()
    after_credit = counts(session)
    again = action(session, "u1", *args, idempotency_key="k1", **kwargs)
    session.commit()
    assert first.replayed is False
    assert again.model_dump() == {**first.model_dump(), "replayed": True}
    assert counts(session) == after_credit
    assert after_credit[1:] == (after_first[1] + 1, after_first[2])
    stored = session.get(LedgerEntry, int(first.ledger_entry_id))
    assert stored is not None and stored.idempotency_key == "k1"
    assert_ledger_consistent(session)


def test_same_key_other_request_is_a_conflict(session: Session) -> None:
    opened(session)
    movements.debit(session, "u1", 10, "image_generation", idempotency_key="k", metadata={"a": 1})
    session.commit()
    before = counts(session)
    others: list[tuple[Movement, tuple[Any, ...], dict[str, Any]]] = [
        (movements.debit, (20, "image_generation"), {"metadata": {"a": 1}}),
        (movements.debit, (10, "sora_image"), {"metadata": {"a": 1}}),
        (movements.debit, (10, "image_generation"), {"metadata": {"a": 2}}),
        (
            movements.debit,
            (10, "image_generation"),
            {"metadata": {"a": 1}, "allow_overdraft": True},
        ),
        (movements.credit, (10,), {"metadata": {"a": 1}}),
        (movements.refund, (10,), {"metadata": {"a": 1}}),
        (movements.charge, ("image_generation",), {"metadata": {"a": 1}}),
        (movements.reset_balance, (10,), {"metadata": {"a": 1}}),
    ]
    for action, args, kwargs in others:
        err = refused(session, action, "u1", *args, idempotency_key="k", **kwargs)
        assert (err.code, err.message) == CONFLICT, (action.__name__, args, kwargs)
    assert counts(session) == before


def test_keys_are_scoped_per_user(session: Session) -> None:
    opened(session, "u1")
    opened(session, "u2")
    a = movements.debit(session, "u1", 10, "image_generation", idempotency_key="order-7")
    b = movements.debit(session, "u2", 10, "image_generation", idempotency_key="order-7")
    session.commit()
    assert (a.replayed, b.replayed) == (False, False)
    assert a.ledger_entry_id != b.ledger_entry_id
    assert accounts.get_balance(session, "u1").tokens_balance == 90
    assert accounts.get_balance(session, "u2").tokens_balance == 90
    # And a different request under that key for u2 is u2's conflict alone.
    err = refused(session, movements.credit, "u2", 5, idempotency_key="order-7")
    assert (err.code, err.message) == CONFLICT
    assert_ledger_consistent(session)


def test_a_refused_request_does_not_burn_its_key(session: Session) -> None:
    opened(session, balance=10)
    err = refused(session, movements.debit, "u1", 50, "image_generation", idempotency_key="k")
    assert (err.code, err.message) == (
        "INSUFFICIENT_TOKENS",
        "Insufficient tokens. Required: 50, Available: 10",
    )
    assert counts(session) == (10, 1, 0)
    movements.credit(session, "u1", 100)
    session.commit()
    out = movements.debit(session, "u1", 50, "image_generation", idempotency_key="k")
    session.commit()
    assert (out.replayed, out.new_balance) == (False, 60)
    # Nor is the key tied to the refused request's parameters.
    refused(session, movements.refund, "u1", 5, original_entry_id="999", idempotency_key="r")
    assert movements.credit(session, "u1", 5, idempotency_key="r").replayed is False
    session.commit()
    assert_ledger_consistent(session)


def test_keys_outlive_pruned_entries(session: Session) -> None:
    opened(session)
    first = movements.debit(session, "u1", 10, "image_generation", idempotency_key="k")
    session.commit()
    ledger.delete_old_entries(session, datetime(2999, 1, 1, tzinfo=UTC))
    session.commit()
    again = movements.debit(session, "u1", 10, "image_generation", idempotency_key="k")
    session.commit()
    assert again.model_dump() == {**first.model_dump(), "replayed": True}
    assert accounts.get_balance(session, "u1").tokens_balance == 90


def debit_10_with(key: str) -> Callable[[int], MovementOut | DomainError]:
    return lambda _: attempt(movements.debit, "u1", 10, "image_generation", idempotency_key=key)


def test_concurrent_requests_with_one_key_apply_once(session: Session) -> None:
    opened(session, balance=1000)
    rounds = 5

    for n in range(rounds):
        key = f"k{n}"
        outcomes = run_in_threads(THREADS, debit_10_with(key))
        assert all(isinstance(o, MovementOut) for o in outcomes), outcomes
        applied = [o for o in outcomes if isinstance(o, MovementOut) and not o.replayed]
        replays = [o for o in outcomes if isinstance(o, MovementOut) and o.replayed]
        assert len(applied) == 1
        assert len(replays) == THREADS - 1
        assert {o.model_dump_json() for o in replays} == {
            applied[0].model_copy(update={"replayed": True}).model_dump_json()
        }
        assert applied[0].new_balance == 1000 - 10 * (n + 1)
    session.commit()
    assert counts(session) == (1000 - 10 * rounds, 1 + rounds, rounds)
    assert_ledger_consistent(session)


def test_concurrent_conflicting_requests_with_one_key(session: Session) -> None:
    opened(session, balance=1000)
    outcomes = run_in_threads(
        THREADS,
        lambda i: attempt(movements.debit, "u1", 10 + i, "image_generation", idempotency_key="k"),
    )
    applied = [o for o in outcomes if isinstance(o, MovementOut)]
    conflicts = [o for o in outcomes if isinstance(o, DomainError)]
    assert len(applied) == 1 and not applied[0].replayed
    assert {(e.code, e.message) for e in conflicts} == {CONFLICT}
    assert len(conflicts) == THREADS - 1
    session.commit()
    assert counts(session) == (applied[0].new_balance, 2, 1)
    assert_ledger_consistent(session)


# --- retention -------------------------------------------------------------------------------


def backdate_record(session: Session, key: str, age: timedelta) -> None:
    session.execute(
        text("UPDATE idempotency_records SET created_at = clock_timestamp() - :age WHERE key = :k"),
        {"age": age, "k": key},
    )
    session.commit()


def test_retention_prunes_only_records_past_the_window(session: Session) -> None:
    opened(session)
    first = movements.debit(session, "u1", 10, "image_generation", idempotency_key="old")
    movements.debit(session, "u1", 10, "image_generation", idempotency_key="recent")
    session.commit()
    backdate_record(session, "old", timedelta(days=7, seconds=1))
    backdate_record(session, "recent", timedelta(days=6, hours=23))
    assert idempotency.prune(session, timedelta(days=7)) == 1
    session.commit()
    assert set(session.scalars(select(IdempotencyRecord.key))) == {"recent"}
    # Inside the window a key still replays; past it, the same request applies again.
    assert movements.debit(session, "u1", 10, "image_generation", idempotency_key="recent").replayed
    again = movements.debit(session, "u1", 10, "image_generation", idempotency_key="old")
    session.commit()
    assert (again.replayed, again.new_balance) == (False, first.new_balance - 20)
    assert_ledger_consistent(session)


def test_retention_works_in_bounded_chunks(session: Session) -> None:
    opened(session, balance=1000)
    for i in range(7):
        movements.credit(session, "u1", 1, idempotency_key=f"k{i}")
    session.commit()
    session.execute(
        text("UPDATE idempotency_records SET created_at = created_at - interval '30 days'")
    )
    session.commit()
    chunks: list[int] = []
    total = idempotency.prune_all(
        session_factory(), timedelta(days=7), chunk_size=3, on_chunk=chunks.append
    )
    assert (total, chunks) == (7, [3, 3, 1])
    assert counts(session)[2] == 0
