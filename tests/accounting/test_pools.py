"""Pools (contract v1.2): members spend their pool's grants through the same functions, one
entry in the pool's ledger with ``spent_by``; keys are the member's; tokens enter through the
pool; members' reads show the pool's balance with their own ``tokens_spent``."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting import accounts, batches, grants, ledger, movements, renewals, reservations
from accounting.errors import DomainError
from models.schemas import DebitIn
from tests.support import assert_ledger_consistent, attempt, refused, run_in_threads
from worker.db import session_factory, session_scope


def tree(session: Session, pool_balance: int = 1000) -> None:
    """pool -> team -> alice, bob; pool -> carol (a member right under the pool)."""
    accounts.open_account(session, "pool", initial_balance=pool_balance)
    accounts.open_account(session, "team", parent_id="pool")
    accounts.open_account(session, "alice", parent_id="team")
    accounts.open_account(session, "bob", parent_id="team")
    accounts.open_account(session, "carol", parent_id="pool")
    session.commit()


def code(exc: DomainError) -> tuple[str, str]:
    return exc.code, exc.message


def test_a_member_is_opened_under_a_parent_at_most_three_levels_deep(session: Session) -> None:
    tree(session)
    alice = accounts.get_balance(session, "alice")
    assert (alice.pool_id, alice.parent_id) == ("pool", "team")
    team = accounts.get_balance(session, "team")
    assert (team.pool_id, team.parent_id) == ("pool", "pool")
    pool = accounts.get_balance(session, "pool")
    assert (pool.pool_id, pool.parent_id) == (None, None)
    assert code(refused(session, accounts.open_account, "dave", parent_id="alice")) == (
        "VALIDATION_ERROR",
        "Invalid arguments: parent_id: at most 3 levels (pool, team, member); the parent is a"
        " member of a team",
    )
    assert code(refused(session, accounts.open_account, "dave", parent_id="nobody")) == (
        "PARENT_NOT_FOUND",
        "Parent account not found",
    )
    refusal = refused(session, accounts.open_account, "dave", initial_balance=5, parent_id="team")
    assert refusal.code == "VALIDATION_ERROR" and "initial_balance" in refusal.message
    # Opened again: nothing changes, whatever the kwargs.
    again = accounts.open_account(session, "alice", parent_id="team")
    assert not again.created and again.pool_id == "pool"
    refusal = refused(session, accounts.get_balance, "dave")
    assert refusal.code == "USER_NOT_FOUND"


def test_members_spend_the_pools_grants_with_one_entry_in_the_pools_ledger(
    session: Session,
) -> None:
    accounts.open_account(session, "pool")
    movements.credit(session, "pool", 50, grant_kind="promo")  # priority 20: burnt first
    movements.credit(session, "pool", 100)
    accounts.open_account(session, "team", parent_id="pool")
    accounts.open_account(session, "alice", parent_id="team")
    session.commit()
    out = movements.debit(session, "alice", 70, "image_generation", idempotency_key="k1")
    session.commit()
    assert (out.user_id, out.amount, out.balance_before, out.new_balance) == (
        "alice",
        -70,
        150,
        80,
    )
    assert out.tokens_spent == 70
    [entry] = ledger.user_entries(session, "alice").entries
    assert (entry.id, entry.user_id, entry.spent_by, entry.tokens_amount) == (
        out.ledger_entry_id,
        "pool",
        "alice",
        -70,
    )
    assert [g.amount for g in entry.grants] == [-50, -20]  # the pool's burn order
    assert ledger.user_entries(session, "team").entries == []
    assert len(ledger.user_entries(session, "pool").entries) == 3
    alice = accounts.get_balance(session, "alice")
    pool = accounts.get_balance(session, "pool")
    assert (alice.tokens_balance, alice.tokens_available, alice.tokens_spent) == (80, 80, 70)
    assert (pool.tokens_balance, pool.tokens_spent) == (80, 70)
    assert accounts.get_balance(session, "team").tokens_spent == 0
    assert grants.list_grants(session, "alice").grants == []
    assert ledger.total_spent(session, "alice").total == 70
    assert ledger.total_spent(session, "team").total == 0
    assert ledger.statistics(session, "alice").operation_count == 1
    assert ledger.statistics(session, "pool").operation_count == 3
    assert_ledger_consistent(session)
    assert ledger.reconcile(session).mismatches == []


def test_idempotency_keys_are_the_members_own(session: Session) -> None:
    tree(session)
    first = movements.debit(session, "alice", 10, "image_generation", idempotency_key="job")
    bob = movements.debit(session, "bob", 10, "image_generation", idempotency_key="job")
    again = movements.debit(session, "alice", 10, "image_generation", idempotency_key="job")
    session.commit()
    assert again.replayed and again.ledger_entry_id == first.ledger_entry_id
    assert not bob.replayed and bob.ledger_entry_id != first.ledger_entry_id
    assert accounts.get_balance(session, "pool").tokens_balance == 980
    assert code(
        refused(session, movements.debit, "alice", 11, "image_generation", idempotency_key="job")
    )[0] == ("IDEMPOTENCY_CONFLICT")


@pytest.mark.parametrize(
    "action",
    [
        lambda s: movements.credit(s, "alice", 10),
        lambda s: movements.reset_balance(s, "alice", 10),
        lambda s: accounts.set_tier(s, "team", "Business"),
    ],
    ids=["credit", "reset_balance", "set_tier"],
)
def test_tokens_and_plans_enter_through_the_pool(session: Session, action: object) -> None:
    tree(session)
    assert callable(action)
    try:
        action(session)
    except DomainError as exc:
        session.rollback()
        assert code(exc) == (
            "MEMBER_ACCOUNT",
            "Account is a member of pool: move tokens on the pool",
        )
    else:
        raise AssertionError("not refused")
    assert accounts.get_balance(session, "pool").tokens_balance == 1000
    assert_ledger_consistent(session)


def test_a_members_reservation_holds_the_pools_grants_under_the_members_keys(
    session: Session,
) -> None:
    tree(session, 100)
    held = reservations.reserve(session, "alice", amount=30, idempotency_key="r1")
    session.commit()
    assert held.tokens_available == 70
    assert accounts.get_balance(session, "bob").tokens_available == 70
    assert code(refused(session, movements.debit, "bob", 71, "image_generation"))[0] == (
        "INSUFFICIENT_TOKENS"
    )
    again = reservations.reserve(session, "alice", amount=30, idempotency_key="r1")
    assert again.replayed and again.reservation_id == held.reservation_id
    reservations.extend(session, held.reservation_id, amount=10, idempotency_key="x1")
    out = reservations.capture(session, held.reservation_id, amount=35, idempotency_key="c1")
    session.commit()
    assert (out.user_id, out.amount, out.new_balance, out.tokens_spent) == ("alice", -35, 65, 35)
    [entry] = ledger.user_entries(session, "alice").entries
    assert (entry.user_id, entry.spent_by, entry.tokens_amount) == ("pool", "alice", -35)
    assert accounts.get_balance(session, "pool").tokens_reserved == 0
    # The capture's key is alice's, the task id a member's capture sends.
    replay = reservations.capture(session, held.reservation_id, amount=35, idempotency_key="c1")
    assert replay.replayed
    other = reservations.reserve(session, "carol", amount=5)
    released = reservations.release(session, other.reservation_id, idempotency_key="rel")
    session.commit()
    assert released.status == "released"
    assert accounts.get_balance(session, "pool").tokens_reserved == 0
    members_held = session.execute(
        text("SELECT sum(subtree_held) FROM accounts WHERE pool_id IS NOT NULL")
    ).scalar_one()
    assert members_held == 0
    assert_ledger_consistent(session)


def test_subtree_holds_follow_reservations_made_below(session: Session) -> None:
    tree(session, 100)
    a = reservations.reserve(session, "alice", amount=10)
    reservations.reserve(session, "bob", amount=20)
    reservations.reserve(session, "carol", amount=5)
    reservations.extend(session, a.reservation_id, amount=1)
    session.commit()
    held = {u: h for u, h in session.execute(text("SELECT user_id, subtree_held FROM accounts"))}
    assert held == {"pool": 0, "team": 31, "alice": 11, "bob": 20, "carol": 5}
    session.execute(text("UPDATE reservations SET expires_at = clock_timestamp()"))
    session.commit()
    assert reservations.expire_batch(session) == 3
    session.commit()
    held = {u: h for u, h in session.execute(text("SELECT user_id, subtree_held FROM accounts"))}
    assert set(held.values()) == {0}


def test_a_member_refunds_only_what_it_spent_and_the_pool_any_entry(session: Session) -> None:
    tree(session, 100)
    alice = movements.debit(session, "alice", 30, "image_generation")
    bob = movements.debit(session, "bob", 20, "image_generation")
    session.commit()
    assert code(
        refused(session, movements.refund, "alice", 5, original_entry_id=bob.ledger_entry_id)
    ) == ("ENTRY_NOT_FOUND", "Original entry not found")
    back = movements.refund(session, "alice", 10, original_entry_id=alice.ledger_entry_id)
    pooled = movements.refund(session, "pool", 5, original_entry_id=bob.ledger_entry_id)
    loose = movements.refund(session, "carol", 3)
    session.commit()
    assert (back.user_id, back.new_balance, back.tokens_spent) == ("alice", 60, 20)
    assert (pooled.user_id, pooled.new_balance) == ("pool", 65)
    assert (loose.user_id, loose.new_balance, loose.tokens_spent) == ("carol", 68, 0)
    assert accounts.get_balance(session, "bob").tokens_spent == 20
    spenders = [e.spent_by for e in ledger.user_entries(session, "pool").entries]
    assert spenders == ["carol", None, "alice", "bob", "alice", None]
    assert_ledger_consistent(session)
    assert ledger.reconcile(session).mismatches == []


def test_a_batch_of_members_and_pools_locks_each_pool_once(session: Session) -> None:
    tree(session, 100)
    accounts.open_account(session, "solo", initial_balance=10)
    session.commit()
    out = batches.debit_batch(
        session,
        [
            DebitIn(user_id="alice", amount=40, operation_type="image_generation"),
            DebitIn(user_id="solo", amount=5, operation_type="image_generation"),
            DebitIn(user_id="carol", amount=40, operation_type="image_generation"),
            DebitIn(user_id="pool", amount=40, operation_type="image_generation"),
        ],
        "batch-1",
    )
    session.commit()
    assert (out.applied, out.refused) == (3, 1)
    assert out.results[3].success is False
    assert accounts.get_balance(session, "carol").tokens_spent == 40
    assert_ledger_consistent(session)


def test_racing_members_of_one_pool_never_overspend_it(clean_db: None) -> None:
    """The pool's row is the lock every member's movement takes first: 24 members of a
    3-level tree racing debits, reserves and captures of a pool of 100 tokens spend exactly
    100, and the pool's ledger chains."""
    attempt(accounts.open_account, "pool", initial_balance=100)
    for team in ("t0", "t1"):
        attempt(accounts.open_account, team, parent_id="pool")
    members = [f"m{i}" for i in range(24)]
    for i, member in enumerate(members):
        attempt(accounts.open_account, member, parent_id=f"t{i % 2}")

    def work(i: int) -> int:
        spent = 0
        for _ in range(5):
            if i % 3 == 0:
                held = attempt(reservations.reserve, members[i], amount=2)
                if not isinstance(held, DomainError):
                    done = attempt(reservations.capture, held.reservation_id)
                    assert not isinstance(done, DomainError), done
                    spent += 2
            else:
                out = attempt(movements.debit, members[i], 1, "chatgpt_message")
                if not isinstance(out, DomainError):
                    spent += 1
                else:
                    assert out.code == "INSUFFICIENT_TOKENS", out
        return spent

    spent = run_in_threads(24, work)
    with session_scope() as session:
        assert sum(spent) == 100
        assert accounts.get_balance(session, "pool").tokens_balance == 0
        by_member = {m: accounts.get_balance(session, m).tokens_spent for m in members}
        assert [by_member[m] for m in members] == spent
        assert_ledger_consistent(session)
        assert ledger.reconcile(session).mismatches == []


def test_members_are_never_due_and_renewals_of_a_member_are_refused(session: Session) -> None:
    """Renewals are the pool's: a member (default tier Gift, never renewed) is not due, and the
    sweep renews the pool alone (without the predicate the member got an allowance grant)."""
    tree(session, 0)
    assert renewals.due(session).user_ids == ["pool"]
    for action in (renewals.renew_user, renewals.check_eligibility):
        refusal = refused(session, action, "alice")
        assert code(refusal) == (
            "MEMBER_ACCOUNT",
            "Account is a member of pool: move tokens on the pool",
        )
    out = renewals.sweep(session_factory())
    assert (out.total_processed, out.successful) == (1, 1)
    assert grants.list_grants(session, "alice").grants == []
    assert accounts.get_balance(session, "alice").tokens_balance == 100  # the pool's allowance


def test_a_members_page_read_while_the_pools_grant_is_due_expires_it(session: Session) -> None:
    """The due grant is the pool's: a member's page settles the pool (probing the member's own
    grants would find none, and leave the grant active past its end)."""
    tree(session, pool_balance=0)
    movements.credit(session, "pool", 40, "purchase", grant_kind="promo")
    movements.debit(session, "alice", 5, "image_generation")
    session.execute(text("UPDATE grants SET expires_at = clock_timestamp() - interval '1 second'"))
    session.commit()
    [entry] = ledger.user_entries(session, "alice").entries
    assert (entry.spent_by, entry.tokens_amount) == ("alice", -5)
    session.commit()
    assert session.execute(text("SELECT status FROM grants")).scalar_one() == "expired"
    assert accounts.get_balance(session, "pool").tokens_balance == 0
    assert_ledger_consistent(session)
