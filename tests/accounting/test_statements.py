"""A one-statement movement alone (autocommit, ``worker.db.statement_scope``): it commits by
itself in one round trip, and a refusal leaves nothing behind, as the rollback of a transaction
would (accounting/statements.py, tokens_ok() of migration 0006)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting import accounts, movements, reservations
from accounting.errors import DomainError
from tests.support import assert_ledger_consistent, run_in_threads, statements_sent
from worker.db import session_factory, statement_scope


def _rows(user: str) -> dict[str, Any]:
    with session_factory()() as s:
        return {
            "account": tuple(
                s.execute(
                    text(
                        "SELECT tokens_balance, tokens_reserved, tokens_spent, debt"
                        " FROM accounts WHERE user_id = :u"
                    ),
                    {"u": user},
                ).one()
            ),
            "entries": s.execute(
                text("SELECT kind, tokens_amount FROM ledger_entries WHERE user_id = :u"),
                {"u": user},
            ).all(),
            "keys": s.execute(
                text("SELECT key, response IS NULL FROM idempotency_records WHERE user_id = :u"),
                {"u": user},
            ).all(),
            "grants": s.execute(
                text(
                    "SELECT remaining, expired, status FROM grants WHERE user_id = :u ORDER BY id"
                ),
                {"u": user},
            ).all(),
        }


@pytest.fixture
def user(clean_db: None) -> str:
    """An account of 100 tokens: a due promo grant of 30 and a purchased one of 70."""
    with session_factory()() as s, s.begin():
        accounts.open_account(s, "u", initial_balance=0)
        movements.credit(s, "u", 30, "purchase", grant_kind="promo")
        movements.credit(s, "u", 70, "purchase")
        s.execute(
            text(
                "UPDATE grants SET expires_at = clock_timestamp() - interval '1 second'"
                " WHERE kind = 'promo'"
            )
        )
    return "u"


def test_a_debit_alone_is_one_round_trip_and_commits_by_itself(user: str) -> None:
    with statements_sent() as sent, statement_scope() as s:
        out = movements.debit(s, user, 10, "image_generation", idempotency_key="k")
        assert [q.split("(")[0] for q in sent] == ["SELECT r.* FROM tokens_spend"], sent
        # Committed before the scope ends: another connection sees it already.
        assert _rows(user)["account"] == (60, 0, 10, 0)
    assert out.new_balance == 60
    with session_factory()() as s:
        assert_ledger_consistent(s)


def test_a_refusal_alone_leaves_no_claim_and_no_expiry(user: str) -> None:
    before = _rows(user)
    with pytest.raises(DomainError) as refused, statement_scope() as s:
        movements.debit(s, user, 80, "image_generation", idempotency_key="k")
    # The figure is the one the refusing statement saw, after expiring the promo grant.
    assert (refused.value.code, refused.value.message) == (
        "INSUFFICIENT_TOKENS",
        "Insufficient tokens. Required: 80, Available: 70",
    )
    # Without tokens_ok() the claim and the expiry entry would have committed.
    assert _rows(user) == before
    with statement_scope() as s:
        out = movements.debit(s, user, 70, "image_generation", idempotency_key="k")
    assert (out.new_balance, out.replayed) == (0, False)
    after = _rows(user)
    assert [kind for kind, _ in after["entries"]].count("expiry") == 1
    with session_factory()() as s:
        assert_ledger_consistent(s)


def test_replay_conflict_and_unknown_user_alone(user: str) -> None:
    with statement_scope() as s:
        first = movements.charge(s, user, "image_generation", idempotency_key="c")
    with statement_scope() as s:
        again = movements.charge(s, user, "image_generation", idempotency_key="c")
    assert again == first.model_copy(update={"replayed": True})
    with pytest.raises(DomainError) as conflict, statement_scope() as s:
        movements.debit(s, user, 1, "image_generation", idempotency_key="c")
    assert conflict.value.code == "IDEMPOTENCY_CONFLICT"
    with pytest.raises(DomainError) as missing, statement_scope() as s:
        movements.debit(s, "nobody", 1, "image_generation", idempotency_key="n")
    assert missing.value.code == "USER_NOT_FOUND"
    with session_factory()() as s:
        assert s.execute(text("SELECT count(*) FROM idempotency_records")).scalar_one() == 1


def test_a_credit_and_a_reset_are_one_statement_each(user: str) -> None:
    """In a transaction and alone; the credit expires the due promo grant first, the reset
    spends in burn order (the oldest purchased grant first)."""

    with statements_sent() as credits:
        with session_factory()() as s, s.begin():
            movements.credit(s, user, 25, "purchase", idempotency_key="c1")
        with statement_scope() as s:
            movements.credit(s, user, 5, "purchase", idempotency_key="c2")
    assert _rows(user)["account"] == (100, 0, 0, 0)
    with statements_sent() as resets:
        with session_factory()() as s, s.begin():
            movements.reset_balance(s, user, 60, idempotency_key="r1")
        with statement_scope() as s:
            movements.reset_balance(s, user, 80, idempotency_key="r2")
    names = [q.split("(")[0] for q in credits + resets]
    assert names == [
        "SELECT * FROM tokens_credit",
        "SELECT r.* FROM tokens_credit",
        "SELECT * FROM tokens_reset",
        "SELECT r.* FROM tokens_reset",
    ], names
    rows = _rows(user)
    assert rows["account"] == (80, 0, 0, 0)
    assert rows["grants"] == [(0, 30, "expired"), (30, 0, "active"), (25, 0, "active"),
                              (5, 0, "active"), (20, 0, "active")]  # fmt: skip
    with session_factory()() as s:
        assert_ledger_consistent(s)


def test_a_credit_alone_pays_the_debt_first(user: str) -> None:
    with statement_scope() as s:
        movements.debit(s, user, 100, "image_generation", allow_overdraft=True)
    assert _rows(user)["account"] == (-30, 0, 100, 30)
    with statement_scope() as s:
        out = movements.credit(s, user, 20, "purchase", grant_kind="promo", idempotency_key="p")
    with statement_scope() as s:
        again = movements.reset_balance(s, user, 15, idempotency_key="r")
    assert (out.balance_before, out.new_balance, again.amount) == (-30, -10, 25)
    rows = _rows(user)
    assert rows["account"] == (15, 0, 100, 0)
    # Both new grants paid debt: the credit all of it, the reset 10 of its 25.
    assert rows["grants"][-2:] == [(0, 0, "depleted"), (15, 0, "active")]
    with session_factory()() as s:
        assert_ledger_consistent(s)


def _credit(
    key: str, amount: int = 10, hours: int = 1, user: str = "u"
) -> Callable[[Session], Any]:
    def run(s: Session) -> Any:
        now = s.execute(text("SELECT clock_timestamp()")).scalar_one()
        return movements.credit(
            s,
            user,
            amount,
            "purchase",
            idempotency_key=key,
            expires_at=now + timedelta(hours=hours),
        )

    return run


def _reset(key: str, new_balance: int = 10, user: str = "u") -> Callable[[Session], Any]:
    return lambda s: movements.reset_balance(s, user, new_balance, idempotency_key=key)


REFUSALS = {
    "credit, expires_at not in the future": (
        _credit("k", hours=-1),
        "VALIDATION_ERROR",
        "Invalid arguments: expires_at: must be in the future",
    ),
    "credit, key reused": (
        _credit("done-c", amount=11),
        "IDEMPOTENCY_CONFLICT",
        "Idempotency key reused with different parameters",
    ),
    "credit, no account": (_credit("k", user="nobody"), "USER_NOT_FOUND", "User not found"),
    "reset below the reserved tokens": (
        _reset("k"),
        "BELOW_RESERVED",
        "Balance cannot go below reserved tokens. Reserved: 50",
    ),
    "reset, key reused": (
        _reset("done-r", new_balance=11),
        "IDEMPOTENCY_CONFLICT",
        "Idempotency key reused with different parameters",
    ),
    "reset, no account": (_reset("k", user="nobody"), "USER_NOT_FOUND", "User not found"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_credit_or_reset_refused_alone_leaves_nothing(user: str, case: str) -> None:
    """Each refusal after the key's claim and (but for the unknown user) the expiry of a due
    grant: neither stays."""
    movement, code, message = REFUSALS[case]
    with session_factory()() as s, s.begin():
        # The promo grant expires here; a new one, due at once, is left for the refused movement.
        reservations.reserve(s, user, 50)
        movements.credit(s, user, 10, "purchase", grant_kind="promo", idempotency_key="done-c")
        movements.reset_balance(s, user, 60, idempotency_key="done-r")
        s.execute(
            text(
                "UPDATE grants SET expires_at = clock_timestamp() - interval '1 second'"
                " WHERE kind = 'promo' AND status = 'active'"
            )
        )
    before = _rows(user)
    assert before["grants"][-2][2] == "active"
    with pytest.raises(DomainError) as refused, statement_scope() as s:
        movement(s)
    assert (refused.value.code, refused.value.message) == (code, message)
    assert _rows(user) == before
    with session_factory()() as s:
        assert s.execute(text("SELECT count(*) FROM idempotency_records")).scalar_one() == 2
        assert_ledger_consistent(s)


def test_racing_credits_and_debits_alone_keep_the_debt_exact(clean_db: None) -> None:
    """Under READ COMMITTED each credit reads the debt and the grants after the account lock:
    credits racing overdraft debits never pay a debt twice nor leave free tokens beside it."""
    with session_factory()() as s, s.begin():
        accounts.open_account(s, "u", initial_balance=0)

    def work(t: int) -> None:
        for i in range(10):
            with statement_scope() as s:
                if t % 2:
                    movements.credit(s, "u", 7, "purchase", idempotency_key=f"c{t}-{i}")
                else:
                    movements.debit(s, "u", 9, "image_generation", allow_overdraft=True)

    run_in_threads(6, work)
    balance = 3 * 10 * (7 - 9)
    rows = _rows("u")
    assert rows["account"] == (balance, 0, 3 * 10 * 9, -balance)
    assert all(remaining == 0 for remaining, _, _ in rows["grants"])
    with session_factory()() as s:
        assert_ledger_consistent(s)
