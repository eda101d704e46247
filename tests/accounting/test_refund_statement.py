"""tokens_refund() (sql/movements/tokens_refund.sql): one statement, alone and in a
transaction; every refusal leaves nothing; concurrent refunds never exceed the original. Where
the tokens go back (the debt part, the original's grants last spent first, ended grants) is
compared with an independent model of the contract in tests/accounting/test_against_oracle.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from accounting import accounts, movements
from accounting.errors import DomainError
from models.schemas import MovementOut
from tests.accounting.test_statements import _rows
from tests.support import assert_ledger_consistent, attempt, run_in_threads, statements_sent
from worker.db import session_factory, statement_scope

_DUE = (
    "UPDATE grants SET expires_at = clock_timestamp() - interval '1 second'"
    " WHERE user_id = :u AND kind = 'promo'"
)


@pytest.fixture
def charged(clean_db: None) -> str:
    """User u: 100 tokens, then a debit of 30 (the returned entry id), and a due promo grant."""
    with session_factory()() as s, s.begin():
        accounts.open_account(s, "u", initial_balance=100)
        entry = movements.debit(s, "u", 30, "image_generation").ledger_entry_id
        movements.credit(s, "u", 5, "purchase", grant_kind="promo")
        s.execute(text(_DUE.replace(":u", "'u'")))
    return entry


def _sent(action: Callable[[], Any]) -> tuple[Any, list[str]]:
    with statements_sent() as sent:
        return action(), sent


def test_a_refund_is_one_statement(charged: str) -> None:
    def in_a_transaction() -> MovementOut:
        with session_factory()() as s, s.begin():
            return movements.refund(s, "u", 10, original_entry_id=charged, idempotency_key="a")

    def alone() -> MovementOut:
        with statement_scope() as s:
            return movements.refund(s, "u", 10, idempotency_key="b")

    first, sent = _sent(in_a_transaction)
    assert len(sent) == 1, sent
    second, sent = _sent(alone)
    assert [q.split("(")[0] for q in sent] == ["SELECT r.* FROM tokens_refund"], sent
    # 70, the promo's 5 expired by the first refund, +10, +10.
    assert (first.new_balance, second.new_balance, second.tokens_spent) == (80, 90, 10)
    with session_factory()() as s:
        assert_ledger_consistent(s)


@pytest.mark.parametrize(
    ("user", "amount", "original", "key", "code"),
    [
        ("u", 31, "charged", "k", "REFUND_EXCEEDS_ORIGINAL"),
        ("u", 5, "opening", "k", "ENTRY_NOT_FOUND"),
        ("u", 5, "charged", "taken", "IDEMPOTENCY_CONFLICT"),
        ("nobody", 5, None, "k", "USER_NOT_FOUND"),
    ],
)
def test_a_refusal_alone_leaves_nothing(
    charged: str, user: str, amount: int, original: str | None, key: str, code: str
) -> None:
    with statement_scope() as s:
        movements.refund(s, "u", 1, original_entry_id=charged, idempotency_key="taken")
        opening = s.execute(text("SELECT min(id) FROM ledger_entries")).scalar_one()
    target = {"charged": charged, "opening": str(opening), None: None}[original]

    def rows() -> Any:
        with session_factory()() as s:
            claims = s.execute(text("SELECT user_id, key FROM idempotency_records")).all()
            totals = s.execute(text("SELECT * FROM refund_totals")).all()
        return _rows("u"), claims, totals

    before = rows()
    with pytest.raises(DomainError) as refused, statement_scope() as s:
        movements.refund(s, user, amount, original_entry_id=target, idempotency_key=key)
    assert refused.value.code == code
    assert rows() == before
    if code == "REFUND_EXCEEDS_ORIGINAL":
        assert refused.value.message == "Refund exceeds original charge. Charged: 30, Refunded: 1"


def test_concurrent_refunds_alone_never_exceed_the_original(charged: str) -> None:
    def refund_8(_: int) -> MovementOut | DomainError:
        try:
            with statement_scope() as s:
                return movements.refund(s, "u", 8, original_entry_id=charged)
        except DomainError as exc:
            return exc

    outcomes = run_in_threads(6, refund_8)
    ok = [o for o in outcomes if isinstance(o, MovementOut)]
    assert len(ok) == 3
    assert {o.message for o in outcomes if isinstance(o, DomainError)} == {
        "Refund exceeds original charge. Charged: 30, Refunded: 24"
    }
    assert sorted(o.new_balance for o in ok) == [78, 86, 94]
    last = attempt(movements.refund, "u", 6, original_entry_id=charged)
    assert isinstance(last, MovementOut) and last.new_balance == 100
    with session_factory()() as s:
        assert_ledger_consistent(s)
