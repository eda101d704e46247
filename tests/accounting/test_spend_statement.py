"""The movement functions (tokens_spend, tokens_refund, tokens_credit, tokens_reset,
tokens_capture, tokens_reserve, tokens_release: migrations 0005, 0007, 0008, 0009, 0010) against
the Python reference they replace on PostgreSQL.

The same random movements run for two users: ``fn``'s debits, charges, credits, balance resets,
refunds, reserves, captures and releases through the one statement, ``ref``'s through
accounting/grants.py (the portable path SQLite runs). After every step their accounts, entries,
splits, grants, reservations and holds, results, refusals and events must be the same.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, text
from sqlalchemy.orm import Session

from accounting import accounts, events, movements, reservations, statements
from accounting.errors import DomainError
from tests.support import assert_ledger_consistent, attempt, run_in_threads
from worker.db import get_engine, session_factory, session_scope, statement_scope

USERS = ("ref", "fn")


@contextmanager
def python_path(on: bool) -> Iterator[None]:
    before = statements.ENABLED
    statements.ENABLED = not on
    try:
        yield
    finally:
        statements.ENABLED = before


def _state(session: Session, user: str) -> dict[str, Any]:
    """The user's rows, ids replaced by their rank among the user's own (same creation order)."""
    grant_ids = [
        g
        for (g,) in session.execute(
            text("SELECT id FROM grants WHERE user_id = :u ORDER BY id"), {"u": user}
        )
    ]
    entry_ids = [
        e
        for (e,) in session.execute(
            text("SELECT id FROM ledger_entries WHERE user_id = :u ORDER BY id"), {"u": user}
        )
    ]
    g_rank = {g: i for i, g in enumerate(grant_ids)}
    e_rank = {e: i for i, e in enumerate(entry_ids)}
    account = session.execute(
        text(
            "SELECT tokens_balance, tokens_reserved, tokens_spent, debt FROM accounts"
            " WHERE user_id = :u"
        ),
        {"u": user},
    ).one()
    entries = []
    for row in session.execute(
        text(
            "SELECT id, kind, operation_type, tokens_amount, balance_before, balance_after,"
            " idempotency_key, original_entry_id, metadata FROM ledger_entries"
            " WHERE user_id = :u ORDER BY created_at, id"
        ),
        {"u": user},
    ):
        meta = dict(row.metadata)
        if "grant_id" in meta:
            meta["grant_id"] = g_rank[int(meta["grant_id"])]
        meta.pop("reservation_id", None)
        entries.append(
            (
                e_rank[row.id],
                row.kind,
                row.operation_type,
                row.tokens_amount,
                row.balance_before,
                row.balance_after,
                row.idempotency_key,
                None if row.original_entry_id is None else e_rank[row.original_entry_id],
                meta,
            )
        )
    splits = sorted(
        (e_rank[e], g_rank[g], a, s)
        for e, g, a, s in session.execute(
            text(
                "SELECT eg.entry_id, eg.grant_id, eg.amount, eg.seq FROM entry_grants eg"
                " JOIN ledger_entries e ON e.id = eg.entry_id WHERE e.user_id = :u"
            ),
            {"u": user},
        )
    )
    grants = [
        (
            *(g_rank[r.id], r.kind, r.amount, r.remaining, r.held, r.spent, r.expired),
            *(r.returned, r.priority, r.status, r.ended_at is None),
        )
        for r in session.execute(
            text("SELECT * FROM grants WHERE user_id = :u ORDER BY id"), {"u": user}
        )
    ]
    # A capture's, release's or refund's digest names a reservation or entry id of the user's own.
    keys = sorted(
        (k, None if k.startswith(("cp", "rl", "rf")) else h, r is None)
        for k, h, r in session.execute(
            text("SELECT key, request_hash, response FROM idempotency_records WHERE user_id = :u"),
            {"u": user},
        )
    )
    # Reservations in creation order, and what each holds of each grant (by the grant's rank).
    holds = [
        tuple(r)
        for r in session.execute(
            text(
                "SELECT r.amount, r.operation_type, r.status, r.metadata, r.overcapture_limit,"
                " r.captured_amount, r.expires_at - r.created_at, r.settled_at IS NULL,"
                " r.ledger_entry_id IS NULL,"
                " (SELECT array_agg(array[g.n, rg.amount] ORDER BY g.n)"
                "  FROM reservation_grants rg JOIN (SELECT id, row_number() OVER (ORDER BY id) AS n"
                "  FROM grants WHERE user_id = :u) g ON g.id = rg.grant_id"
                "  WHERE rg.reservation_id = r.id)"
                " FROM reservations r WHERE r.user_id = :u ORDER BY r.created_at"
            ),
            {"u": user},
        )
    ]
    return {
        "account": tuple(account),
        "entries": entries,
        "splits": splits,
        "grants": grants,
        "keys": keys,
        "holds": holds,
    }


def _outcome(result: Any) -> Any:
    if isinstance(result, DomainError):
        return ("refused", result.code, result.message)
    if result is None:
        return None
    out = result.model_dump(mode="json")
    for field in ("user_id", "ledger_entry_id", "reservation_id", "expires_at"):
        out.pop(field, None)
    return out


class Pair:
    """Both users' histories, step by step."""

    def __init__(self, alone: bool = False) -> None:
        self.alone = alone
        self.entries: dict[str, list[int]] = {u: [] for u in USERS}
        self.reservations: dict[str, list[str]] = {u: [] for u in USERS}
        self.events: dict[str, list[tuple[Any, ...]]] = {u: [] for u in USERS}
        self.outcomes: list[Any] = []

    def run(self, user: str, action: Callable[[Session], Any], one_statement: bool = False) -> Any:
        """``action`` in a transaction; ``fn``'s one-statement movements alone when ``alone``."""
        scope = statement_scope if self.alone and one_statement and user == "fn" else session_scope
        try:
            with python_path(user == "ref"), scope() as session:
                result = action(session)
        except DomainError as exc:
            result = exc
        entry = getattr(result, "ledger_entry_id", None)
        if entry is not None and not getattr(result, "replayed", False):
            self.entries[user].append(int(entry))
        reservation = getattr(result, "reservation_id", None)
        if reservation is not None and not getattr(result, "replayed", False):
            self.reservations[user].append(reservation)
        return result


def _step(rng: random.Random, pair: Pair, step: int, keys: list[tuple[str, int, bool]]) -> None:
    """One random movement for both users; asserts the outcomes are the same."""
    roll = rng.random()
    one_statement = roll < 0.9  # every movement; time passing below is not one
    amount = rng.choice([1, 5, 10, 40, 150, 400, 1000])
    meta = {"step": step, "tag": rng.choice(["a", "b"])}
    action: Callable[[str], Callable[[Session], Any]]
    if roll < 0.35:
        overdraft = rng.random() < 0.15
        if keys and rng.random() < 0.25:
            key, was, overdraft = rng.choice(keys)  # a replay, or a conflict (amount differs)
            amount = was if rng.random() < 0.6 else was + 1
            meta = {"step": was}
        else:
            key = f"k{step}"
            meta = {"step": amount}
            keys.append((key, amount, overdraft))

        def action(u: str) -> Callable[[Session], Any]:
            return lambda s: movements.debit(
                s, u, amount, "image_generation", overdraft, meta, idempotency_key=key
            )
    elif roll < 0.45:
        charge_key = f"c{step}" if rng.random() < 0.8 else None
        op = rng.choice(["image_generation", "chatgpt_message"])

        def action(u: str) -> Callable[[Session], Any]:
            return lambda s: movements.charge(s, u, op, meta, idempotency_key=charge_key)
    elif roll < 0.55:
        kind = rng.choice(["purchased", "promo"])
        hours = rng.choice([None, 1, 2, 5, -1])  # -1: refused, expires_at not in the future
        priority = rng.choice([None, 5, 20, 50])
        expires = None
        if hours is not None:
            now = session_factory()().execute(text("SELECT clock_timestamp()")).scalar_one()
            expires = now + timedelta(hours=hours)

        def action(u: str) -> Callable[[Session], Any]:
            return lambda s: movements.credit(
                s, u, amount, "purchase", meta, f"cr{step}", kind, expires, priority
            )
    elif roll < 0.6:
        # Up (a grant paying the debt first) or down (burn order); under the reserved tokens
        # refused. Few keys: some replay, most conflict.
        target = rng.choice([0, 40, 500, 2000])
        reset_key = f"rb{rng.randrange(15)}"
        reset_meta = {"tag": rng.choice(["a", "b"])}

        def action(u: str) -> Callable[[Session], Any]:
            return lambda s: movements.reset_balance(
                s, u, target, "r", reset_meta, idempotency_key=reset_key
            )
    elif roll < 0.7:
        pick = rng.random()
        part = rng.choice([1, 3, 10, 100])

        def action(u: str) -> Callable[[Session], Any]:
            entries = pair.entries[u]
            original = entries[int(pick * len(entries))] if entries else None
            return lambda s: movements.refund(
                s, u, part, "r", original, idempotency_key=f"rf{step}"
            )
    elif roll < 0.8:

        def action(u: str) -> Callable[[Session], Any]:
            return lambda s: reservations.reserve(
                s, u, amount, overcapture_limit=10, idempotency_key=f"rs{step}"
            )
    elif roll < 0.9:
        pick = rng.random()
        take = rng.choice([None, 1, 5, 50])
        settle = rng.random() < 0.7
        reason = rng.choice([None, "done"])

        def action(u: str) -> Callable[[Session], Any]:
            held = pair.reservations[u]
            if not held:
                return lambda s: None
            rid = held[int(pick * len(held))]
            if settle:
                return lambda s: reservations.capture(s, rid, take, idempotency_key=f"cp{step}")
            return lambda s: reservations.release(s, rid, reason, idempotency_key=f"rl{step}")
    else:
        # Time passes for up to three grants: they become due, not in id order, and the next
        # movement expires them, each through its own entry.
        rank = rng.randrange(8)

        def action(u: str) -> Callable[[Session], Any]:
            def due(s: Session) -> None:
                s.execute(
                    text(
                        "UPDATE grants SET expires_at ="
                        " clock_timestamp() - interval '1 second' * (1 + r.n % 2)"
                        " FROM (SELECT id, row_number() OVER (ORDER BY id) AS n FROM grants"
                        " WHERE user_id = :u ORDER BY id OFFSET :r LIMIT 3) AS r"
                        " WHERE grants.id = r.id AND grants.status = 'active'"
                    ),
                    {"u": u, "r": rank},
                )

            return due

    results = [_outcome(pair.run(u, action(u), one_statement=one_statement)) for u in USERS]
    assert results[0] == results[1], f"step {step}: {results}"
    pair.outcomes.append(results[1])


@pytest.mark.parametrize(
    ("seed", "alone"), [(1, False), (2, False), (3, False), (4, True), (5, True)]
)
def test_one_statement_agrees_with_the_python_path(clean_db: None, seed: int, alone: bool) -> None:
    """In a caller's transaction, and alone (autocommit: a refusal must leave nothing, as the
    Python path's rollback does)."""
    rng = random.Random(seed)
    pair = Pair(alone)

    def on_balance(sender: Any, **fields: Any) -> None:
        pair.events[fields["user_id"]].append(
            (fields["balance"], fields["tokens_reserved"], fields["operation"])
        )

    events.balance_changed.connect(on_balance, weak=False)
    try:
        with session_factory()() as s, s.begin():
            for u in USERS:
                accounts.open_account(s, u, initial_balance=500)
        keys: list[tuple[str, int, bool]] = []
        for step in range(250):
            _step(rng, pair, step, keys)
            if step % 25 == 0 or step == 249:
                with session_factory()() as s:
                    assert _state(s, "ref") == _state(s, "fn"), f"step {step}"
    finally:
        events.balance_changed.disconnect(on_balance)
    assert pair.events["ref"] == pair.events["fn"]
    refusals = {o[1] for o in pair.outcomes if isinstance(o, tuple)}
    # BELOW_RESERVED is rarer: tests/accounting/test_statements.py has it for sure.
    assert {
        "INSUFFICIENT_TOKENS",
        "IDEMPOTENCY_CONFLICT",
        "VALIDATION_ERROR",
        "RESERVATION_NOT_ACTIVE",
    } <= refusals
    assert any(isinstance(o, dict) and o.get("replayed") for o in pair.outcomes)
    with session_factory()() as s:
        kinds = {e[1] for e in _state(s, "fn")["entries"]}
        assert {"debit", "charge", "credit", "adjustment", "expiry", "refund", "capture"} <= kinds
        assert_ledger_consistent(s)


def test_a_debit_is_one_statement(clean_db: None) -> None:
    with session_factory()() as s, s.begin():
        accounts.open_account(s, "u", initial_balance=100)
    sent: list[str] = []

    def count(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        sent.append(sql)

    event.listen(get_engine(), "before_cursor_execute", count)
    try:
        with session_factory()() as s, s.begin():
            out = movements.debit(s, "u", 10, "image_generation", idempotency_key="one")
        with session_factory()() as s, s.begin():
            again = movements.charge(s, "u", "image_generation", idempotency_key="two")
    finally:
        event.remove(get_engine(), "before_cursor_execute", count)
    assert len(sent) == 2, sent
    assert (out.new_balance, again.new_balance) == (90, 80)
    with python_path(True):
        sent.clear()
        event.listen(get_engine(), "before_cursor_execute", count)
        try:
            with session_factory()() as s, s.begin():
                movements.debit(s, "u", 10, "image_generation", idempotency_key="three")
        finally:
            event.remove(get_engine(), "before_cursor_execute", count)
        assert len(sent) >= 7  # what the Python path costs, for the record


def test_racing_statements_read_the_grants_after_the_lock(clean_db: None) -> None:
    """Under READ COMMITTED each statement of tokens_spend() reads after the account lock: racing
    debits over several grants (one due) never burn a grant twice nor past what it has, and
    exactly what was available is spent."""
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

    def debits(t: int) -> list[Any]:
        return [
            attempt(movements.debit, "u", 3, "image_generation", idempotency_key=f"{t}-{i}")
            for i in range(12)
        ]

    outcomes = [o for batch in run_in_threads(8, debits) for o in batch]
    ok = [o for o in outcomes if not isinstance(o, DomainError)]
    assert len(ok) == 200 // 3
    assert {o.code for o in outcomes if isinstance(o, DomainError)} == {"INSUFFICIENT_TOKENS"}
    assert sorted(o.new_balance for o in ok) == list(range(200 - 3 * len(ok), 200, 3))
    with session_factory()() as s:
        state = _state(s, "u")
        assert state["account"] == (200 % 3, 0, 3 * len(ok), 0)
        assert [g[3] for g in state["grants"]] == [0, 0, 200 % 3, 0]  # burn order, then expired
        assert [e[1] for e in state["entries"]].count("expiry") == 1
        assert_ledger_consistent(s)
