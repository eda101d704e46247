"""tokens_capture() (migration 0009): a capture in one statement, alone or in a transaction.

Alone (``worker.db.statement_scope``) it commits by itself in one round trip and each refusal
leaves nothing behind, as the Python path's rollback does. Its settlement paths agree with the
Python path's row for row, event for event (the random movements of
tests/accounting/test_spend_statement.py run it too).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting import accounts, movements, reservations
from accounting.errors import DomainError
from models.schemas import CaptureOut, DebitIn, metadata_bytes
from tasks.reservations import capture as capture_task
from tests.support import assert_ledger_consistent, run_in_threads, statements_sent
from worker.db import session_factory, statement_scope

TABLES = (
    "accounts",
    "grants",
    "reservations",
    "reservation_grants",
    "ledger_entries",
    "entry_grants",
    "idempotency_records",
)
META: dict[str, Any] = {"job": "j", "f": 1.5e-7}


def _rows() -> list[list[tuple[Any, ...]]]:
    with session_factory()() as s:
        return [
            [tuple(r) for r in s.execute(text(f"SELECT * FROM {t} ORDER BY 1, 2"))] for t in TABLES
        ]


def _due(s: Session, user: str, kind: str) -> None:
    s.execute(
        text(
            "UPDATE grants SET expires_at = clock_timestamp() - interval '1 second'"
            " WHERE user_id = :u AND kind = :k AND status = 'active'"
        ),
        {"u": user, "k": kind},
    )


def _held(s: Session, user: str, amount: int = 40, limit: int = 20) -> str:
    """A promo grant of 30 and a purchase of 70; a reservation of ``amount`` (over-capture
    ``limit``) holds all the promo, which is then due: nothing of it expires until a capture
    frees what it does not spend."""
    accounts.open_account(s, user, initial_balance=0)
    movements.credit(s, user, 30, "purchase", grant_kind="promo")
    movements.credit(s, user, 70, "purchase")
    r = reservations.reserve(s, user, amount, metadata=META, overcapture_limit=limit)
    _due(s, user, "promo")
    return r.reservation_id


@pytest.fixture
def held(clean_db: None) -> str:
    with session_factory()() as s, s.begin():
        return _held(s, "u")


def _sent(action: Callable[[], Any]) -> tuple[Any, list[str]]:
    """What ``action`` returns and the statements it sent (up to the first parenthesis)."""
    with statements_sent() as sent:
        result = action()
    return result, [q.split("(")[0] for q in sent]


def test_a_capture_alone_is_one_round_trip_and_commits_by_itself(held: str) -> None:
    def alone() -> CaptureOut:
        with statement_scope() as s:
            out = reservations.capture(s, held, 10, {"b": 2}, idempotency_key="k")
            with session_factory()() as other:
                status = other.execute(text("SELECT status FROM reservations")).scalar_one()
            assert status == "captured"
            return out

    out, sent = _sent(alone)
    # The second is the look from another connection.
    assert sent == ["SELECT r.* FROM tokens_capture", "SELECT status FROM reservations"]
    assert (out.amount, out.balance_before, out.new_balance) == (-10, 100, 90)
    with session_factory()() as s:
        b = accounts.get_balance(s, "u")
        # The 20 of the promo the capture freed expired after it, through their own entry.
        assert (b.tokens_balance, b.tokens_reserved, b.tokens_spent) == (70, 0, 10)
        last = s.execute(text("SELECT kind, tokens_amount FROM ledger_entries ORDER BY id"))
        assert last.all()[-2:] == [("capture", -10), ("expiry", -20)]
        assert_ledger_consistent(s)


def test_the_capture_task_runs_alone(held: str) -> None:
    """tokens.capture is ``alone=True``: its one statement, no BEGIN or COMMIT."""
    done, sent = _sent(lambda: capture_task.apply(kwargs={"reservation_id": held}).get())
    assert sent == ["SELECT r.* FROM tokens_capture"]
    assert (done["success"], done["amount"]) == (True, -40)
    refused, sent = _sent(lambda: capture_task.apply(kwargs={"reservation_id": held}).get())
    assert sent == ["SELECT r.* FROM tokens_capture"]
    assert refused["error_code"] == "RESERVATION_NOT_ACTIVE"


def test_a_capture_in_a_transaction_is_one_statement(clean_db: None) -> None:
    with session_factory()() as s, s.begin():
        rids = [_held(s, "u"), _held(s, "v")]

    def capture(rid: str) -> Callable[[], CaptureOut]:
        def run() -> CaptureOut:
            with session_factory()() as s, s.begin():
                return reservations.capture(s, rid, 55, idempotency_key="k")

        return run

    out, sent = _sent(capture(rids[0]))
    assert sent == ["SELECT * FROM tokens_capture"]
    assert (out.amount, out.overcaptured, out.shortfall, out.new_balance) == (-55, 15, 0, 45)


def _captured(s: Session, rid: str) -> None:
    reservations.capture(s, rid, idempotency_key="first")


def _released(s: Session, rid: str) -> None:
    reservations.release(s, rid)


def _expired(s: Session, rid: str) -> None:
    s.execute(text("UPDATE reservations SET expires_at = clock_timestamp() - interval '1 second'"))


def _keyed(s: Session, rid: str) -> None:
    reservations.capture(s, rid, 10, idempotency_key="k")


def _nothing(s: Session, rid: str) -> None:
    pass


BIG = {"b": "y" * 8150}
REFUSALS: dict[str, tuple[Callable[[Session, str], None], dict[str, Any], str, str | None]] = {
    "not found": (
        _nothing,
        {"reservation_id": "nope"},
        "RESERVATION_NOT_FOUND",
        "Reservation not found",
    ),
    "exceeds": (
        _nothing,
        {"amount": 61},
        "CAPTURE_EXCEEDS_RESERVATION",
        "Capture exceeds reservation. Reserved: 60, Requested: 61",
    ),
    "captured": (_captured, {}, "RESERVATION_NOT_ACTIVE", "Reservation is captured"),
    "released": (_released, {}, "RESERVATION_NOT_ACTIVE", "Reservation is released"),
    "expired": (_expired, {}, "RESERVATION_NOT_ACTIVE", "Reservation is expired"),
    "conflict": (
        _keyed,
        {"amount": 11},
        "IDEMPOTENCY_CONFLICT",
        "Idempotency key reused with different parameters",
    ),
    "metadata": (_nothing, {"metadata": BIG}, "VALIDATION_ERROR", None),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_refusal_alone_leaves_nothing(held: str, case: str) -> None:
    """Each refusal comes after the key's claim (the reservation's read aside): without
    tokens_ok() the claim would have committed."""
    before_call, kwargs, code, message = REFUSALS[case]
    with session_factory()() as s, s.begin():
        before_call(s, held)
    if message is None:  # the size Python gives the merged metadata (a float in it included)
        size = metadata_bytes({**META, **BIG, "reservation_id": held})
        message = (
            f"Invalid arguments: metadata: merged with the reservation's metadata it is {size}"
            " bytes serialized; at most 8192 allowed"
        )
    before = _rows()
    call: dict[str, Any] = {
        "reservation_id": held,
        "amount": None,
        "idempotency_key": "k",
        **kwargs,
    }
    with pytest.raises(DomainError) as refused, statement_scope() as s:
        reservations.capture(s, **call)
    assert (refused.value.code, refused.value.message) == (code, message)
    assert _rows() == before


def test_an_invalid_amount_sends_nothing(held: str) -> None:
    def zero() -> None:
        with pytest.raises(DomainError) as refused, statement_scope() as s:
            reservations.capture(s, held, 0)
        assert refused.value.code == "INVALID_AMOUNT"

    assert _sent(zero)[1] == []


def test_a_capture_alone_replays_its_key(held: str) -> None:
    with statement_scope() as s:
        first = reservations.capture(s, held, 45, idempotency_key="k")
    with statement_scope() as s:
        again = reservations.capture(s, held, 45, idempotency_key="k")
    assert again == first.model_copy(update={"replayed": True})
    assert (again.overcaptured, again.shortfall) == (5, 0)
    with session_factory()() as s:
        kinds = s.execute(text("SELECT kind FROM ledger_entries")).scalars().all()
        assert kinds.count("capture") == 1
        assert_ledger_consistent(s)


def test_racing_captures_alone_settle_once_and_the_losers_leave_nothing(clean_db: None) -> None:
    """The conditional update decides: one capture wins, the others find it captured (read
    again after the winner committed), and their claims go with their refusals."""
    with session_factory()() as s, s.begin():
        rids = [_held(s, f"u{i}", amount=30, limit=30) for i in range(6)]

    def captures(t: int) -> list[Any]:
        outcomes: list[Any] = []
        for rid in rids:
            try:
                with statement_scope() as s:
                    outcomes.append(reservations.capture(s, rid, 20 + t, idempotency_key=f"t{t}"))
            except DomainError as exc:
                outcomes.append(exc)
        return outcomes

    by_thread = run_in_threads(4, captures)
    for i in range(len(rids)):
        outcomes = [batch[i] for batch in by_thread]
        won = [o for o in outcomes if isinstance(o, CaptureOut)]
        assert len(won) == 1, outcomes
        assert {(o.code, o.message) for o in outcomes if isinstance(o, DomainError)} == {
            ("RESERVATION_NOT_ACTIVE", "Reservation is captured")
        }
    with session_factory()() as s:
        assert s.execute(text("SELECT count(*) FROM idempotency_records")).scalar_one() == 6
        assert s.execute(text("SELECT sum(tokens_reserved) FROM accounts")).scalar_one() == 0
        assert_ledger_consistent(s)


# --- the metadata bound measures what is stored ------------------------------------------------

# Strings the schema lets through: no NUL, no lone surrogate (neither is valid in PostgreSQL's
# jsonb; models.schemas refuses both).
_TEXT = st.characters(exclude_categories=["Cs"], exclude_characters="\x00")
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_TEXT, max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(_TEXT, max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(_TEXT, max_size=6), _JSON, max_size=4))
def test_the_metadata_size_is_the_size_postgresql_stores(value: dict[str, Any]) -> None:
    """Issue 20: Python measured what the producer sent, tokens_json_bytes() what Python read
    back, and PostgreSQL stores numbers written out in full: {"x": 1e300} passed the 8 KiB bound
    as 12 bytes and was stored as 307. All three now agree, for any JSON value."""
    with session_factory()() as s:
        stored, sql_size = s.execute(
            text("SELECT m::text, tokens_json_bytes(m) FROM CAST(:v AS jsonb) AS t(m)"),
            {"v": json.dumps(value)},
        ).one()
    read_back = json.loads(stored)
    assert metadata_bytes(value) == sql_size == metadata_bytes(read_back)
    compact = json.dumps(read_back, separators=(",", ":"), ensure_ascii=False)
    if not any(isinstance(v, float) for v in _leaves(read_back)):
        assert len(compact.encode()) == sql_size


def _leaves(value: Any) -> Iterator[Any]:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        else:
            yield item


def test_metadata_that_would_store_past_the_bound_is_refused() -> None:
    small_to_send = {f"k{n}": 1e300 for n in range(40)}  # ~500 bytes as sent, ~12 KiB stored
    with pytest.raises(ValueError, match="bytes serialized; at most 8192 allowed"):
        DebitIn.model_validate(
            {
                "user_id": "u",
                "amount": 1,
                "operation_type": "chatgpt_message",
                "metadata": small_to_send,
            }
        )
