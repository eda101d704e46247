"""tokens_refund() (migration 0007) against the Python reference it replaces on PostgreSQL.

The random movements of test_spend_statement.py include refunds; here the cases they reach
rarely or never, scripted: a debt part (paid, then a grant), an entry with no split, a due grant
expired by the refund, tokens put back into ended grants, a refund without an original paying
debt, replays, conflicts and every refusal. Then the one statement, alone and in a transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting import accounts, events, movements
from accounting.errors import DomainError
from models.schemas import MovementOut
from tests.accounting.test_spend_statement import USERS, Pair, _outcome, _state
from tests.accounting.test_statements import _rows
from tests.support import assert_ledger_consistent, attempt, run_in_threads, statements_sent
from worker.db import session_factory, statement_scope

Step = Callable[[str, Pair], Callable[[Session], Any]]


def _sql(sql: str) -> Step:
    """A change of the user's rows that no movement makes (time passing, an old entry)."""

    def step(u: str, pair: Pair) -> Callable[[Session], Any]:
        return lambda s: s.execute(text(sql), {"u": u}) and None

    return step


def _refund(amount: int, original: int | str | None = None, key: str | None = None) -> Step:
    """A refund against the user's ``original``-th entry (an int), or the id given (a str)."""

    def step(u: str, pair: Pair) -> Callable[[Session], Any]:
        target = pair.entries[u][original] if isinstance(original, int) else original
        return lambda s: movements.refund(s, u, amount, "r", target, {"n": 1}, key)

    return step


def _move(action: Callable[..., Any], *args: Any, **kw: Any) -> Step:
    def step(u: str, pair: Pair) -> Callable[[Session], Any]:
        return lambda s: action(s, u, *args, **kw)

    return step


_DUE = (
    "UPDATE grants SET expires_at = clock_timestamp() - interval '1 second'"
    " WHERE user_id = :u AND kind = 'promo'"
)

# The user's entries (``_refund``'s index): 0 the promo credit, 1 the debit, 2 the first refund...
SCRIPT: list[tuple[Step, bool]] = [
    # The promo grant spent first, then the opening balance's adjustment grant, and 10 as debt.
    (_move(movements.credit, 30, "purchase", grant_kind="promo", priority=1), False),
    (_move(movements.debit, 60, "image_generation", True), True),  # entry 1
    (_refund(5, 1, "rf1"), True),  # the debt part: pays 5 of the debt
    (_refund(5, 1, "rf1"), True),  # a replay
    (_refund(6, 1, "rf1"), True),  # a conflict
    (_sql(_DUE), False),
    (_move(movements.credit, 10, "purchase", grant_kind="promo", priority=1), False),
    (_sql(_DUE), False),  # the 5 left of the new grant (it paid the debt) expire in the next refund
    # The other 5 of the debt part: no debt left, so a new grant; 20 into the adjustment grant.
    (_refund(25, 1, "rf2"), True),
    (_refund(30, 1), True),  # 30 into the ended promo grant: expired again at once
    (_refund(1, 1), True),  # REFUND_EXCEEDS_ORIGINAL
    (_refund(1, 0), True),  # a credit: ENTRY_NOT_FOUND
    (_refund(1, "x1"), True),  # not an id: ENTRY_NOT_FOUND before the statement
    (_refund(1, "999999"), True),  # no such entry
    (_refund(61, 1), True),  # more than the entry ever charged
    # An entry older than grants: no split. Its tokens pay the debt, then a new grant.
    (_move(movements.debit, 50, "image_generation", True), True),
    (
        _sql(
            "DELETE FROM entry_grants WHERE entry_id = (SELECT max(id) FROM ledger_entries"
            " WHERE user_id = :u AND kind = 'debit')"
        ),
        False,
    ),
    (_move(movements.debit, 40, "image_generation", True), True),
    (_refund(45, -2), True),
    # Without an original: a grant that pays debt first (all of it: a depleted grant).
    (_move(movements.debit, 30, "image_generation", True), True),
    (_refund(4, None, "rf3"), True),
    (_refund(100, None), True),
    (_move(movements.charge, "image_generation"), True),
    (_refund(3, -1), True),
]


@pytest.mark.parametrize("alone", [False, True])
def test_scripted_refunds_agree_with_the_python_path(clean_db: None, alone: bool) -> None:
    pair = Pair(alone)
    current: list[str] = []
    expired: dict[str, list[tuple[Any, ...]]] = {u: [] for u in USERS}

    def on_balance(sender: Any, **fields: Any) -> None:
        pair.events[fields["user_id"]].append(
            (fields["balance"], fields["tokens_reserved"], fields["operation"])
        )

    def on_expired(sender: Any, **fields: Any) -> None:
        expired[current[-1]].append((fields["grants"], fields["tokens"]))

    events.balance_changed.connect(on_balance, weak=False)
    events.grants_expired.connect(on_expired, weak=False)
    try:
        with session_factory()() as s, s.begin():
            for u in USERS:
                accounts.open_account(s, u, initial_balance=20)
        for n, (step, one_statement) in enumerate(SCRIPT):
            results = []
            for u in USERS:
                current.append(u)
                results.append(_outcome(pair.run(u, step(u, pair), one_statement)))
            assert results[0] == results[1], f"step {n}: {results}"
            pair.outcomes.append(results[1])
            with session_factory()() as s:
                assert _state(s, "ref") == _state(s, "fn"), f"step {n}"
    finally:
        events.balance_changed.disconnect(on_balance)
        events.grants_expired.disconnect(on_expired)
    assert pair.events["ref"] == pair.events["fn"]
    assert expired["ref"] == expired["fn"] == [(1, 5), (1, 30)]
    codes = [o[1] for o in pair.outcomes if isinstance(o, tuple)]
    exceeds, not_found = "REFUND_EXCEEDS_ORIGINAL", "ENTRY_NOT_FOUND"
    assert codes == ["IDEMPOTENCY_CONFLICT", exceeds, not_found, not_found, not_found, exceeds]
    assert sum(1 for o in pair.outcomes if isinstance(o, dict) and o["replayed"]) == 1
    with session_factory()() as s:
        state = _state(s, "fn")
        assert state["account"][3] == 0  # every debt paid back
        assert any(g[1] == "adjustment" and g[9] == "depleted" for g in state["grants"])
        assert_ledger_consistent(s, entry_splits=False)  # the splits the script deleted


# --- the one statement ------------------------------------------------------------------------


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
