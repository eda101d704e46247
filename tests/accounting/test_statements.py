"""A one-statement movement alone (autocommit, ``worker.db.statement_scope``): it commits by
itself in one round trip, and a refusal leaves nothing behind, as the rollback of a transaction
would (accounting/statements.py, tokens_ok() of migration 0006)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from accounting import accounts, movements, statements
from accounting.errors import DomainError
from tests.support import assert_ledger_consistent, statements_sent
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


def test_the_portable_path_refuses_to_run_alone(user: str) -> None:
    """Its statements would each commit on their own: no atomicity. It must never run so."""
    before = _rows(user)
    try:
        with pytest.raises(RuntimeError), statement_scope() as s:
            statements.ENABLED = False
            movements.debit(s, user, 10, "image_generation", idempotency_key="p")
        statements.ENABLED = False
        # statement_scope itself keeps a transaction when the statements are off.
        with statement_scope() as s:
            movements.debit(s, user, 10, "image_generation", idempotency_key="p")
            assert not statements.alone(s)
    finally:
        statements.ENABLED = True
    assert _rows(user)["account"][0] == before["account"][0] - 30 - 10
