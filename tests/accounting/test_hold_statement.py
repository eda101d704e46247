"""tokens_reserve() and tokens_release() (migration 0010): one statement each, alone a refusal
leaves nothing behind, and racing holds read the grants after the account lock.
tests/accounting/test_spend_statement.py compares them with the Python path step by step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from sqlalchemy import text

from accounting import accounts, events, movements, reservations
from accounting.errors import DomainError
from tests.support import assert_ledger_consistent, attempt, run_in_threads, statements_sent
from worker.db import session_factory, statement_scope


def _rows(user: str) -> dict[str, Any]:
    with session_factory()() as s:

        def rows(sql: str) -> list[Any]:
            return [tuple(r) for r in s.execute(text(sql), {"u": user})]

        return {
            "account": rows(
                "SELECT tokens_balance, tokens_reserved, tokens_spent, debt, updated_at"
                " FROM accounts WHERE user_id = :u"
            ),
            "entries": rows("SELECT kind, tokens_amount FROM ledger_entries WHERE user_id = :u"),
            "keys": rows(
                "SELECT key, response IS NULL FROM idempotency_records WHERE user_id = :u"
                " ORDER BY created_at"
            ),
            "grants": rows(
                "SELECT remaining, held, expired, status FROM grants WHERE user_id = :u ORDER BY id"
            ),
            "reservations": rows(
                "SELECT id, amount, status, metadata FROM reservations WHERE user_id = :u"
                " ORDER BY created_at"
            ),
            "holds": rows(
                "SELECT rg.reservation_id, rg.grant_id, rg.amount FROM reservation_grants rg"
                " JOIN grants g ON g.id = rg.grant_id WHERE g.user_id = :u ORDER BY 1, 2"
            ),
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


@pytest.fixture
def balance_events() -> Iterator[list[tuple[int, int, str]]]:
    seen: list[tuple[int, int, str]] = []

    def on_balance(sender: Any, **fields: Any) -> None:
        seen.append((fields["balance"], fields["tokens_reserved"], fields["operation"]))

    events.balance_changed.connect(on_balance, weak=False)
    try:
        yield seen
    finally:
        events.balance_changed.disconnect(on_balance)


def _sent(work: Callable[[], Any]) -> list[str]:
    """The statements ``work`` sends, by the name of what they call or do."""
    with statements_sent() as sent:
        work()
    return [sql.split("(")[0] for sql in sent]


def test_reserve_and_release_are_one_statement_each(
    user: str, balance_events: list[tuple[int, int, str]]
) -> None:
    out: list[Any] = []

    def reserve() -> None:
        with statement_scope() as s:
            out.append(reservations.reserve(s, user, 50, idempotency_key="r"))

    def release() -> None:
        with session_factory()() as s, s.begin():
            out.append(reservations.release(s, out[0].reservation_id, "done", "l"))

    assert _sent(reserve) == ["SELECT r.* FROM tokens_reserve"]
    assert _sent(release) == ["SELECT * FROM tokens_release"]
    reserved, released = out
    assert (reserved.amount, reserved.tokens_available) == (50, 20)
    assert released.status == "released"
    rows = _rows(user)
    assert rows["account"][0][:4] == (70, 0, 0, 0)
    assert rows["reservations"][0][2:] == ("released", {"release_reason": "done"})
    assert rows["grants"] == [(0, 0, 30, "expired"), (70, 0, 0, "active")]
    assert rows["keys"] == [("r", False), ("l", False)]
    # The due promo grant expired before the hold; then the hold and its release.
    assert balance_events == [(70, 0, "expiry"), (70, 50, "reserve"), (70, 0, "release")]
    with session_factory()() as s:
        assert_ledger_consistent(s)


def test_replays_alone(user: str) -> None:
    with statement_scope() as s:
        first = reservations.reserve(s, user, 10, ttl_seconds=60, idempotency_key="r")
    with statement_scope() as s:
        again = reservations.reserve(s, user, 10, ttl_seconds=60, idempotency_key="r")
    assert again == first.model_copy(update={"replayed": True})
    with statement_scope() as s:
        released = reservations.release(s, first.reservation_id, idempotency_key="l")
    # A redelivered release answers with its first result, not "Reservation is released".
    with statement_scope() as s:
        assert reservations.release(s, first.reservation_id, idempotency_key="l") == released
    assert _rows(user)["account"][0][:2] == (70, 0)


def _refused(action: Callable[[Any], Any]) -> tuple[str, str]:
    with pytest.raises(DomainError) as refused, statement_scope() as s:
        action(s)
    return refused.value.code, refused.value.message


def test_reserve_refusals_alone_leave_nothing(user: str) -> None:
    with statement_scope() as s:
        reservations.reserve(s, "u", 5, idempotency_key="taken")
    before = _rows(user)
    # Without tokens_ok() the claim would have committed (and an expiry entry, the first time).
    assert _refused(lambda s: reservations.reserve(s, user, 66, idempotency_key="k")) == (
        "INSUFFICIENT_TOKENS",
        "Insufficient tokens. Required: 66, Available: 65",
    )
    assert _refused(lambda s: reservations.reserve(s, user, 6, idempotency_key="taken")) == (
        "IDEMPOTENCY_CONFLICT",
        "Idempotency key reused with different parameters",
    )
    assert _refused(lambda s: reservations.reserve(s, "nobody", 1, idempotency_key="n")) == (
        "USER_NOT_FOUND",
        "User not found",
    )
    assert _rows(user) == before
    with session_factory()() as s:
        assert s.execute(text("SELECT count(*) FROM idempotency_records")).scalar_one() == 1


def test_an_insufficient_reserve_alone_undoes_its_expiries(user: str) -> None:
    before = _rows(user)
    assert _refused(lambda s: reservations.reserve(s, user, 71, idempotency_key="k"))[0] == (
        "INSUFFICIENT_TOKENS"
    )
    assert _rows(user) == before


def test_release_refusals_alone_leave_nothing(user: str) -> None:
    with statement_scope() as s:
        rid = reservations.reserve(s, user, 10).reservation_id
    with statement_scope() as s:
        reservations.release(s, rid, idempotency_key="first")
    before = _rows(user)
    assert _refused(lambda s: reservations.release(s, "missing", idempotency_key="m")) == (
        "RESERVATION_NOT_FOUND",
        "Reservation not found",
    )
    assert _refused(lambda s: reservations.release(s, rid, "why", idempotency_key="first")) == (
        "IDEMPOTENCY_CONFLICT",
        "Idempotency key reused with different parameters",
    )
    # The key was claimed before the status was known: the claim must not stay.
    assert _refused(lambda s: reservations.release(s, rid, idempotency_key="again")) == (
        "RESERVATION_NOT_ACTIVE",
        "Reservation is released",
    )
    assert _rows(user) == before


def test_a_release_expires_the_held_grant_that_ended_meanwhile(
    user: str, balance_events: list[tuple[int, int, str]]
) -> None:
    with statement_scope() as s:
        rid = reservations.reserve(s, user, 60, idempotency_key="r").reservation_id
    with session_factory()() as s, s.begin():
        s.execute(
            text(
                "UPDATE grants SET expires_at = clock_timestamp() - interval '1 second'"
                " WHERE kind = 'purchased'"
            )
        )
    balance_events.clear()
    with statement_scope() as s:
        assert reservations.release(s, rid, idempotency_key="l").status == "released"
    rows = _rows(user)
    assert rows["account"][0][:4] == (0, 0, 0, 0)
    assert rows["grants"][1] == (0, 0, 70, "expired")
    assert [kind for kind, _ in rows["entries"]].count("expiry") == 2
    assert balance_events == [(70, 0, "release"), (0, 0, "expiry")]
    with session_factory()() as s:
        assert_ledger_consistent(s)


def test_racing_reserves_read_the_grants_after_the_lock(clean_db: None) -> None:
    """Racing holds over several grants (one due) never hold a grant past what it has, and hold
    exactly what was available; racing releases of one reservation: one wins."""
    with session_factory()() as s, s.begin():
        accounts.open_account(s, "u", initial_balance=0)
        for priority, amount in ((5, 70), (20, 50), (50, 80)):
            movements.credit(s, "u", amount, "purchase", grant_kind="promo", priority=priority)
        movements.credit(s, "u", 30, "purchase", grant_kind="promo", priority=1)
        s.execute(
            text(
                "UPDATE grants SET expires_at = clock_timestamp() - interval '1 second'"
                " WHERE user_id = 'u' AND priority = 1"
            )
        )

    def reserves(t: int) -> list[Any]:
        return [
            attempt(reservations.reserve, "u", 3, idempotency_key=f"{t}-{i}") for i in range(12)
        ]

    outcomes = [o for batch in run_in_threads(8, reserves) for o in batch]
    ok = [o for o in outcomes if not isinstance(o, DomainError)]
    assert len(ok) == 200 // 3
    assert {o.code for o in outcomes if isinstance(o, DomainError)} == {"INSUFFICIENT_TOKENS"}
    assert sorted(o.tokens_available for o in ok) == list(range(200 - 3 * len(ok), 200, 3))
    rows = _rows("u")
    assert rows["account"][0][:4] == (200, 3 * len(ok), 0, 0)
    assert [(g[0], g[1]) for g in rows["grants"]] == [(70, 70), (50, 50), (80, 78), (0, 0)]
    assert sum(amount for _, _, amount in rows["holds"]) == 3 * len(ok)

    rid = ok[0].reservation_id
    ended = run_in_threads(4, lambda t: attempt(reservations.release, rid))
    assert sum(not isinstance(o, DomainError) for o in ended) == 1
    assert {o.message for o in ended if isinstance(o, DomainError)} == {"Reservation is released"}
    assert _rows("u")["account"][0][1] == 3 * len(ok) - 3
    with session_factory()() as s:
        assert_ledger_consistent(s)
