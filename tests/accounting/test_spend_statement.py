"""tokens_spend() (sql/movements/tokens_spend.sql): a debit or charge is one statement, and
racing statements read the grants after the account lock. The random movements that compared
it with the Python path it replaced are now tests/accounting/test_against_oracle.py's, against
an independent model of the contract.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, text
from sqlalchemy.orm import Session

from accounting import accounts, movements
from accounting.errors import DomainError
from tests.support import assert_ledger_consistent, attempt, run_in_threads
from worker.db import get_engine, session_factory


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
