"""Grants (contract v1.1): burn order, credits that make grants, and the grant reads."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting import accounts, batches, clock, grants, movements, reservations
from accounting.errors import DomainError
from models.schemas import DebitIn, Failure, MovementOut
from tests.accounting.grant_helpers import (
    attempt,
    credited,
    entry_splits,
    grant_rows,
    opened,
    racing_sessions,
)
from tests.polling import wait_for
from tests.support import assert_ledger_consistent, blocked, refused, run_in_threads
from worker.db import session_factory

# --- burn order --------------------------------------------------------------------------------


def test_burn_order_breaks_ties_on_priority_then_expiry_then_creation_then_id(
    session: Session,
) -> None:
    opened(session)
    now = clock.db_now(session)
    soon, later = now + timedelta(days=1), now + timedelta(days=2)
    # Made in this order (ids ascending); each pair below is tied on every key but one.
    a = credited(session, 10, priority=20, expires_at=later)
    b = credited(session, 10, priority=20, expires_at=soon)
    tie_low = credited(session, 10, priority=20, expires_at=soon)
    tie_high = credited(session, 10, priority=20, expires_at=soon)
    forever = credited(session, 10, priority=20)
    first = credited(session, 10, priority=10)
    created = {
        a: now,  # before b, but ends later: expiry decides
        b: now + timedelta(seconds=1),  # ends with the ties, made after them: creation decides
        tie_high: now,  # tied with tie_low on everything: the id decides
        forever: now - timedelta(days=1),  # made first, but never ends: last of priority 20
        first: now + timedelta(seconds=2),  # made last and never ends, but priority 10
        tie_low: now,  # written last, so its row is not first on disk either
    }
    for grant_id, at in created.items():
        session.execute(
            text("UPDATE grants SET created_at = :at WHERE id = :g"), {"at": at, "g": int(grant_id)}
        )
    session.commit()
    order = [first, tie_low, tie_high, b, a, forever]
    assert [g.grant_id for g in grants.list_grants(session, "u1").grants] == order
    hit = []
    for _ in order:
        out = movements.debit(session, "u1", 10, "image_generation")
        session.commit()
        ((grant_id, amount),) = entry_splits(session)[out.ledger_entry_id]
        assert amount == -10
        hit.append(grant_id)
    assert hit == order
    assert all(g.status == "depleted" for g in grant_rows(session).values())
    assert_ledger_consistent(session)


def test_a_charge_spanning_three_grants_splits_in_burn_order(session: Session) -> None:
    opened(session)
    ends = clock.db_now(session) + timedelta(days=3)
    rest = credited(session, 100)  # purchased 50, never ends: last
    promo = credited(session, 3, kind="promo")  # priority 20: first
    ending = credited(session, 4, expires_at=ends)  # purchased 50 that ends: second
    out = movements.charge(session, "u1", "image_generation")  # 10
    session.commit()
    assert entry_splits(session)[out.ledger_entry_id] == [(promo, -3), (ending, -4), (rest, -3)]
    rows = grant_rows(session)
    assert [(rows[g].remaining, rows[g].status) for g in (promo, ending, rest)] == [
        (0, "depleted"),
        (0, "depleted"),
        (97, "active"),
    ]
    assert [g.grant_id for g in grants.list_grants(session, "u1").grants] == [rest]
    assert_ledger_consistent(session)


def test_two_hundred_concurrent_debits_across_grants_of_different_expiry(
    session: Session,
) -> None:
    opened(session)
    now = clock.db_now(session)
    made = [credited(session, 200, expires_at=now + timedelta(days=d)) for d in (5, 1, 3)]
    made += [credited(session, 200), credited(session, 200, kind="promo")]
    burn = [made[4], made[1], made[2], made[0], made[3]]  # promo first, then by expiry
    threads, each = 8, 25  # 200 debits of 7 on 1000 tokens: 142 fit, 6 tokens stay

    with racing_sessions(threads) as sessions:

        def work(_: int) -> list[MovementOut | DomainError]:
            return [
                attempt(sessions, movements.debit, "u1", 7, "image_generation") for _ in range(each)
            ]

        outcomes = [o for batch in run_in_threads(threads, work) for o in batch]
    ok = [o for o in outcomes if isinstance(o, MovementOut)]
    assert len(ok) == 142
    assert {o.code for o in outcomes if isinstance(o, DomainError)} == {"INSUFFICIENT_TOKENS"}
    assert sorted(o.new_balance for o in ok) == list(range(6, 1000, 7))
    rows = grant_rows(session)
    # Spent strictly in burn order: every grant before the last is used up.
    assert [rows[g].remaining for g in burn] == [0, 0, 0, 0, 6]
    splits = entry_splits(session)
    assert all(sum(a for _, a in splits[o.ledger_entry_id]) == -7 for o in ok)
    b = accounts.get_balance(session, "u1")
    assert (b.tokens_balance, b.tokens_spent, b.debt) == (6, 994, 0)
    assert_ledger_consistent(session)


# --- credits make grants -----------------------------------------------------------------------


def test_credit_makes_a_purchased_or_promo_grant_with_its_priority_and_end(
    session: Session,
) -> None:
    opened(session)
    ends = clock.db_now(session) + timedelta(days=30)
    bought = credited(session, 100)
    promo = credited(session, 20, kind="promo", expires_at=ends)
    pinned = credited(session, 5, priority=0)
    rows = grant_rows(session)
    assert [
        (rows[g].kind, rows[g].priority, rows[g].expires_at) for g in (bought, promo, pinned)
    ] == [
        ("purchased", 50, None),
        ("promo", 20, ends),
        ("purchased", 0, None),
    ]
    assert [g.grant_id for g in grants.list_grants(session, "u1").grants] == [pinned, promo, bought]
    assert_ledger_consistent(session)


def test_credit_refuses_an_end_already_past_naming_expires_at(session: Session) -> None:
    opened(session)
    past = clock.db_now(session) - timedelta(seconds=1)
    err = refused(session, movements.credit, "u1", 10, expires_at=past)
    assert err.code == "VALIDATION_ERROR"
    assert "expires_at" in err.message
    assert grants.list_grants(session, "u1", True).grants == []
    err = refused(session, movements.credit, "u1", 10, grant_kind="allowance")
    assert (err.code, "grant_kind" in err.message) == ("VALIDATION_ERROR", True)
    assert_ledger_consistent(session)


def test_get_balance_reports_by_kind_debt_and_next_expiry(session: Session) -> None:
    opened(session, balance=10)
    now = clock.db_now(session)
    credited(session, 30, kind="promo", expires_at=now + timedelta(days=2))
    credited(session, 7, expires_at=now + timedelta(days=1))
    credited(session, 50)
    b = accounts.get_balance(session, "u1")
    assert b.by_kind == {"adjustment": 10, "promo": 30, "purchased": 57}
    assert b.debt == 0
    assert b.next_expiry is not None
    assert (b.next_expiry.at, b.next_expiry.tokens) == (now + timedelta(days=1), 7)
    movements.debit(session, "u1", 120, "image_generation", allow_overdraft=True)
    session.commit()
    b = accounts.get_balance(session, "u1")
    assert (b.tokens_balance, b.debt, b.by_kind, b.next_expiry) == (-23, 23, {}, None)
    credited(session, 30)
    b = accounts.get_balance(session, "u1")
    assert (b.tokens_balance, b.debt, b.by_kind) == (7, 0, {"purchased": 7})
    assert_ledger_consistent(session)


def test_grants_list_active_in_burn_order_then_ended_newest_first(session: Session) -> None:
    opened(session)
    promo = credited(session, 5, kind="promo")
    big = credited(session, 100)
    small = credited(session, 3, priority=1)
    movements.debit(session, "u1", 3, "image_generation")  # ends small
    session.commit()
    movements.debit(session, "u1", 5, "image_generation")  # then promo
    session.commit()
    listed = grants.list_grants(session, "u1")
    assert ([g.grant_id for g in listed.grants], listed.debt) == ([big], 0)
    everything = grants.list_grants(session, "u1", include_ended=True).grants
    assert [(g.grant_id, g.status) for g in everything] == [
        (big, "active"),
        (promo, "depleted"),
        (small, "depleted"),
    ]
    assert_ledger_consistent(session)


# --- the movement's time is read once the account is locked ---------------------------------


def _debit(s: Session) -> Any:
    return movements.debit(s, "u1", 30, "image_generation")


def _batch(s: Session) -> Any:
    item = DebitIn(user_id="u1", amount=30, operation_type="image_generation")
    (result,) = batches.debit_batch(s, [item], "batch-1").results
    return result


def _lock(s: Session) -> Any:
    # The lock renew_user and the reads that settle due grants take.
    grants.lock_current(s, "u1")
    return s.execute(text("SELECT tokens_balance FROM accounts")).scalar_one()


def _release(s: Session) -> Any:
    held = s.execute(text("SELECT id FROM reservations")).scalar_one()
    return reservations.release(s, held).status


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (_debit, "INSUFFICIENT_TOKENS"),
        (_batch, "INSUFFICIENT_TOKENS"),
        (_lock, 0),
        (_release, "released"),
    ],
    ids=["debit", "debit_batch", "lock_current", "release"],
)
def test_a_grant_that_ends_while_a_movement_waits_for_the_lock_is_not_spent(
    clean_db: None, action: Callable[[Session], Any], expected: Any
) -> None:
    """Issue 20: the time was read in the statement that waited for the row lock, so it was the
    time the wait began. A holder that leaves the row as it was (a refused movement, a reader)
    gave back a stale time, and a grant that ended during the wait could still be spent."""
    factory = session_factory()
    with factory() as s:
        opened(s)
        credited(s, 50, expires_at=clock.db_now(s) + timedelta(seconds=2))
        if action is _release:
            reservations.reserve(s, "u1", 20)
            s.commit()
        ends = s.execute(text("SELECT expires_at FROM grants")).scalar_one()
    with factory() as holder:
        holder.execute(text("SELECT 1 FROM accounts WHERE user_id = 'u1' FOR UPDATE"))
        with blocked(lambda: attempt(factory, action)) as waiting:
            with factory() as s:
                wait_for(lambda: clock.db_now(s) > ends, 10, "the grant's end")
            holder.rollback()
        outcome = waiting.result()
    if isinstance(outcome, DomainError):
        outcome = outcome.code
    elif isinstance(outcome, Failure):
        outcome = outcome.error_code
    assert outcome == expected
    with factory() as s:
        # Nothing was spent of it. A refusal leaves it due (the next read or movement, or
        # grants.expire, writes it off); the others wrote it off themselves.
        grant = s.execute(text("SELECT status, spent FROM grants")).one()
        # (A batch keeps what its refused item's lock wrote off: the batch commits.)
        refused_alone = expected == "INSUFFICIENT_TOKENS" and action is not _batch
        assert tuple(grant) == ("active" if refused_alone else "expired", 0)
        assert accounts.get_balance(s, "u1").tokens_balance == 0
        assert_ledger_consistent(s)
