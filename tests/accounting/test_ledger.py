"""accounting/ledger.py: queries, pruning and reconciliation over PostgreSQL."""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from sqlalchemy import event, select, text
from sqlalchemy.orm import Session

from accounting import accounts, clock, ledger, movements, reservations
from accounting.errors import DomainError
from models.schemas import CaptureOut, DeletedOut, EntryOut, MovementOut, ReserveOut, TypeStats
from models.tables import LedgerEntry
from tests.support import assert_ledger_consistent, attempt, blocked, run_in_threads
from worker.db import session_factory

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def day(n: int) -> datetime:
    return T0 + timedelta(days=n)


def backdate(session: Session, entry_id: str | int, when: datetime) -> None:
    session.execute(
        text("UPDATE ledger_entries SET created_at = :when WHERE id = :id"),
        {"when": when, "id": int(entry_id)},
    )


def opening_entry(session: Session, user_id: str, balance: int) -> str:
    accounts.open_account(session, user_id, initial_balance=balance)
    return str(session.scalar(select(LedgerEntry.id).where(LedgerEntry.user_id == user_id)))


def history(session: Session) -> dict[str, str]:
    """u1 and u2, one entry a day from T0 (day 0: u1's opening adjustment; day 1: u2's)."""
    ids = {
        "u1_open": opening_entry(session, "u1", 100),
        "u2_open": opening_entry(session, "u2", 40),
        "u1_debit": movements.debit(session, "u1", 30, "image_generation").ledger_entry_id,
        "u1_charge": movements.charge(session, "u1", "chatgpt_message").ledger_entry_id,
        "u2_charge": movements.charge(session, "u2", "image_generation").ledger_entry_id,
        "u1_refund": movements.refund(session, "u1", 10).ledger_entry_id,
        "u1_credit": movements.credit(session, "u1", 50).ledger_entry_id,
        "u1_image": movements.charge(session, "u1", "image_generation").ledger_entry_id,
    }
    for n, entry_id in enumerate(ids.values()):
        backdate(session, entry_id, day(n))
    session.commit()
    return ids


def grant_of(session: Session, entry_id: str) -> str:
    """The grant an entry of one split changed."""
    grant = session.execute(
        text("SELECT grant_id FROM entry_grants WHERE entry_id = :id"), {"id": int(entry_id)}
    ).scalar_one()
    return str(grant)


def ids_of(entries: list[EntryOut]) -> list[str]:
    return [e.id for e in entries]


# --- queries ---------------------------------------------------------------------------------


def test_user_entries_newest_first_with_every_field(session: Session) -> None:
    ids = history(session)
    out = ledger.user_entries(session, "u1")
    assert ids_of(out.entries) == [
        ids[k] for k in ["u1_image", "u1_credit", "u1_refund", "u1_charge", "u1_debit", "u1_open"]
    ]
    refund = out.entries[2]
    assert refund.model_dump() == {
        "id": ids["u1_refund"],
        "user_id": "u1",
        "operation_type": "refund",
        "tokens_amount": 10,
        "balance_before": 65,
        "balance_after": 75,
        "idempotency_key": None,
        "original_entry_id": None,
        "metadata": {},
        "created_at": day(5),
        "grants": [{"grant_id": refund.grants[0].grant_id, "amount": 10}],
        "spent_by": None,  # v1.2: the account's own movement
        # Chained when written; history() backdated it since (tests/accounting/test_chain.py).
        "prev_hash": refund.prev_hash,
        "hash": refund.hash,
    }
    assert refund.prev_hash == out.entries[3].hash
    assert refund.model_dump(mode="json")["created_at"] == "2026-01-06T00:00:00+00:00"
    assert ledger.user_entries(session, "nobody").entries == []


def test_a_page_is_one_statement_when_no_grant_is_due(session: Session) -> None:
    """Whose ledger it is, the page, its splits and the due-grant probe: one round trip
    (tokens_page); it was two, the account looked up first."""
    history(session)
    seen: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        seen.append(statement)

    bind = session.get_bind()
    event.listen(bind, "before_cursor_execute", count)
    try:
        assert len(ledger.user_entries(session, "u1", limit=3).entries) == 3
        assert len(ledger.entries_by_type(session, "image_generation").entries) == 3
    finally:
        event.remove(bind, "before_cursor_execute", count)
    assert len(seen) == 2, seen


def test_a_page_gives_back_metadata_as_it_was_written(session: Session) -> None:
    """The page is JSON rendered by PostgreSQL and parsed by pydantic: text, numbers and
    nesting come back as the worker read them from rows before."""
    metadata: dict[str, Any] = {
        "text": 'é \u2028 "quoted" \\ back\nslash \U0001f600',
        "big": 2**70,
        "negative": -(2**63),
        "float": 0.1,
        "exp": 1.5e-7,
        "nested": {"list": [1, None, True, False, "x", {"k": []}]},
        "": "empty key",
    }
    accounts.open_account(session, "u1", initial_balance=10)
    movements.debit(session, "u1", 1, "chatgpt_message", metadata=metadata)
    session.commit()
    [entry, _] = ledger.user_entries(session, "u1").entries
    assert entry.metadata == metadata
    assert type(entry.metadata["big"]) is int and type(entry.metadata["float"]) is float
    written = session.execute(
        text("SELECT created_at FROM ledger_entries WHERE id = :id"), {"id": int(entry.id)}
    ).scalar_one()
    assert entry.created_at == written and entry.created_at.tzinfo == UTC


def test_entries_written_at_the_same_instant_are_ordered_by_id(session: Session) -> None:
    opened = opening_entry(session, "u1", 100)
    a = movements.debit(session, "u1", 1, "chatgpt_message").ledger_entry_id
    b = movements.debit(session, "u1", 2, "chatgpt_message").ledger_entry_id
    session.execute(text("UPDATE ledger_entries SET created_at = :t"), {"t": T0})
    session.commit()
    assert ids_of(ledger.user_entries(session, "u1").entries) == [b, a, opened]


def test_user_entries_filtered_by_operation_type(session: Session) -> None:
    ids = history(session)
    out = ledger.user_entries(session, "u1", operation_type="image_generation")
    assert ids_of(out.entries) == [ids["u1_image"], ids["u1_debit"]]
    assert ledger.user_entries(session, "u1", operation_type="sora_image").entries == []


def test_period_is_start_inclusive_end_exclusive(session: Session) -> None:
    ids = history(session)
    # u1 entries sit on days 0, 2, 3, 5, 6, 7.
    out = ledger.user_entries(session, "u1", start_date=day(3), end_date=day(6))
    assert ids_of(out.entries) == [ids["u1_refund"], ids["u1_charge"]]
    assert ids_of(ledger.user_entries(session, "u1", start_date=day(7)).entries) == [
        ids["u1_image"]
    ]
    assert ids_of(ledger.user_entries(session, "u1", end_date=day(2)).entries) == [ids["u1_open"]]
    # Adjacent periods never overlap nor leave a gap.
    first = ledger.user_entries(session, "u1", end_date=day(5)).entries
    second = ledger.user_entries(session, "u1", start_date=day(5)).entries
    assert len(first) + len(second) == 6
    assert set(ids_of(first)).isdisjoint(ids_of(second))
    # The same instant at another offset is the same bound.
    same_instant = datetime(2026, 1, 4, 1, 0, tzinfo=timezone(timedelta(hours=1)))
    assert same_instant == day(3)
    out = ledger.user_entries(session, "u1", start_date=same_instant, end_date=day(6))
    assert ids_of(out.entries) == [ids["u1_refund"], ids["u1_charge"]]


def test_user_entries_paging(session: Session) -> None:
    ids = history(session)
    newest_first = [
        ids[k] for k in ["u1_image", "u1_credit", "u1_refund", "u1_charge", "u1_debit", "u1_open"]
    ]
    pages = [ids_of(ledger.user_entries(session, "u1", limit=4, offset=o).entries) for o in (0, 4)]
    assert pages == [newest_first[:4], newest_first[4:]]
    assert (
        ids_of(ledger.user_entries(session, "u1", limit=2, offset=1).entries) == newest_first[1:3]
    )
    assert ledger.user_entries(session, "u1", offset=6).entries == []


def test_every_page_of_a_history_is_its_slice_of_the_whole(session: Session) -> None:
    """A page further back starts at the entry the offset lands on (found in the index, the
    entries passed over never read): ties of created_at go by id, a period and a type still
    narrow it, and a page past the end is empty."""
    opening_entry(session, "u1", 1000)
    for n in range(11):
        movements.debit(session, "u1", n + 1, ("chatgpt_message", "image_generation")[n % 2])
    session.commit()
    # Four instants, three entries each: every page boundary below falls inside a tie.
    session.execute(
        text(
            "UPDATE ledger_entries SET created_at = :t0 + make_interval(days => (r / 3)::int)"
            " FROM (SELECT id AS i, row_number() OVER (ORDER BY id) - 1 AS r"
            "       FROM ledger_entries) n WHERE id = n.i"
        ),
        {"t0": T0},
    )
    session.commit()
    whole = ids_of(ledger.user_entries(session, "u1", limit=1000).entries)
    assert len(whole) == 12 and whole == sorted(whole, key=int, reverse=True)
    for limit in (1, 2, 4, 5):
        for offset in range(14):
            page = ledger.user_entries(session, "u1", limit=limit, offset=offset)
            assert ids_of(page.entries) == whole[offset : offset + limit], (limit, offset)
    period = ledger.user_entries(session, "u1", start_date=day(1), end_date=day(3), offset=2)
    assert ids_of(period.entries) == whole[3:9][2:]
    typed = ids_of(ledger.user_entries(session, "u1", "image_generation", limit=1000).entries)
    assert len(typed) == 5
    assert (
        ids_of(ledger.user_entries(session, "u1", "image_generation", offset=3).entries)
        == (typed[3:])
    )


def test_entries_by_type(session: Session) -> None:
    ids = history(session)
    out = ledger.entries_by_type(session, "image_generation")
    assert ids_of(out.entries) == [ids["u1_image"], ids["u2_charge"], ids["u1_debit"]]
    assert {e.user_id for e in out.entries} == {"u1", "u2"}
    assert ids_of(
        ledger.entries_by_type(
            session, "image_generation", start_date=day(2), end_date=day(7)
        ).entries
    ) == [ids["u2_charge"], ids["u1_debit"]]
    assert ids_of(
        ledger.entries_by_type(session, "image_generation", limit=1, offset=1).entries
    ) == [ids["u2_charge"]]
    assert ids_of(ledger.entries_by_type(session, "adjustment").entries) == [
        ids["u2_open"],
        ids["u1_open"],
    ]
    assert ledger.entries_by_type(session, "sora_image").entries == []


# --- totals ----------------------------------------------------------------------------------


def test_totals_and_statistics(session: Session) -> None:
    history(session)
    # u1: +100 adjustment, -30 debit, -5 charge, +10 refund, +50 credit, -10 charge.
    assert ledger.total_spent(session, "u1").total == 45
    assert ledger.total_earned(session, "u1").total == 160
    stats = ledger.statistics(session, "u1")
    assert stats.model_dump() == {
        "success": True,
        "total_spent": 45,
        "total_earned": 160,
        "net_change": 115,
        "operation_count": 6,
        "by_type": {
            "adjustment": {"count": 1, "total": 100},
            "chatgpt_message": {"count": 1, "total": -5},
            "image_generation": {"count": 2, "total": -40},
            "purchase": {"count": 1, "total": 50},
            "refund": {"count": 1, "total": 10},
        },
    }
    assert stats.net_change == accounts.get_balance(session, "u1").tokens_balance


def test_totals_over_a_period(session: Session) -> None:
    history(session)
    # Days 2..5 (end exclusive): -30 debit, -5 charge; the refund on day 5 is out.
    assert ledger.total_spent(session, "u1", start_date=day(2), end_date=day(5)).total == 35
    assert ledger.total_earned(session, "u1", start_date=day(2), end_date=day(5)).total == 0
    stats = ledger.statistics(session, "u1", start_date=day(5))
    assert (stats.total_spent, stats.total_earned, stats.net_change, stats.operation_count) == (
        10,
        60,
        50,
        3,
    )
    assert stats.by_type == {
        "image_generation": TypeStats(count=1, total=-10),
        "purchase": TypeStats(count=1, total=50),
        "refund": TypeStats(count=1, total=10),
    }


def test_totals_of_a_user_without_entries(session: Session) -> None:
    accounts.open_account(session, "u1")
    session.commit()
    assert ledger.total_spent(session, "u1").total == 0
    assert ledger.total_earned(session, "u1").total == 0
    assert ledger.statistics(session, "u1").model_dump() == {
        "success": True,
        "total_spent": 0,
        "total_earned": 0,
        "net_change": 0,
        "operation_count": 0,
        "by_type": {},
    }


# --- pruning ---------------------------------------------------------------------------------


def carried(session: Session) -> list[tuple[str, str, int, int, int, datetime]]:
    return [
        (
            e.user_id,
            e.operation_type,
            e.tokens_amount,
            e.balance_before,
            e.balance_after,
            e.created_at,
        )
        for e in session.scalars(
            select(LedgerEntry)
            .where(LedgerEntry.kind == "carried_forward")
            .order_by(LedgerEntry.user_id)
        )
    ]


def test_delete_old_entries_carries_the_sum_forward(session: Session) -> None:
    ids = history(session)
    u3_open = opening_entry(session, "u3", 9)  # written now: nothing to prune
    session.commit()
    out = ledger.delete_old_entries(session, day(4))
    session.commit()
    # Before day 4 (exclusive): u1's open, debit and charge (100 - 30 - 5); u2's open (40).
    assert out.model_dump() == {"success": True, "deleted": 4}
    assert carried(session) == [
        ("u1", "carried_forward", 65, 0, 65, day(3)),
        ("u2", "carried_forward", 40, 0, 40, day(1)),
    ]
    kept = session.scalars(select(LedgerEntry.id).where(LedgerEntry.kind != "carried_forward"))
    assert sorted(str(i) for i in kept) == sorted(
        [ids["u2_charge"], ids["u1_refund"], ids["u1_credit"], ids["u1_image"], u3_open]
    )
    cf = ledger.user_entries(session, "u1").entries[-1]
    assert (cf.operation_type, cf.tokens_amount, cf.metadata) == (
        "carried_forward",
        65,
        {"entries": 3, "older_than": "2026-01-05T00:00:00+00:00"},
    )
    assert ledger.reconcile(session).model_dump() == {
        "success": True,
        "checked": 3,
        "mismatches": [],
    }
    assert_ledger_consistent(session)


def test_delete_old_entries_twice_changes_nothing(session: Session) -> None:
    history(session)
    assert ledger.delete_old_entries(session, day(4)).deleted == 4
    session.commit()
    before = session.execute(text("SELECT * FROM ledger_entries ORDER BY id")).all()
    assert ledger.delete_old_entries(session, day(4)).deleted == 0
    session.commit()
    assert session.execute(text("SELECT * FROM ledger_entries ORDER BY id")).all() == before
    assert ledger.reconcile(session).mismatches == []


def test_a_later_prune_folds_the_earlier_carry_forward(session: Session) -> None:
    history(session)
    ledger.delete_old_entries(session, day(4))
    session.commit()
    # Day 4..6: u2's charge; u1's refund and credit. u1 keeps only its charge of day 7.
    assert ledger.delete_old_entries(session, day(7)).deleted == 3
    session.commit()
    assert carried(session) == [
        ("u1", "carried_forward", 125, 0, 125, day(6)),
        ("u2", "carried_forward", 30, 0, 30, day(4)),
    ]
    u1 = ledger.user_entries(session, "u1").entries
    assert [(e.operation_type, e.tokens_amount) for e in u1] == [
        ("image_generation", -10),
        ("carried_forward", 125),
    ]
    assert u1[1].metadata == {"entries": 5, "older_than": "2026-01-08T00:00:00+00:00"}
    balances = {u: accounts.get_balance(session, u).tokens_balance for u in ("u1", "u2")}
    assert balances == {"u1": 115, "u2": 30}
    assert ledger.reconcile(session).mismatches == []
    assert_ledger_consistent(session)


def test_delete_old_entries_with_nothing_old(session: Session) -> None:
    history(session)
    assert ledger.delete_old_entries(session, day(0)).deleted == 0
    session.commit()
    assert carried(session) == []
    assert len(ledger.user_entries(session, "u1").entries) == 6


def many_users_with_old_entries(session: Session, users: int) -> None:
    """``users`` users, each with two backdated entries (days 0 and 2) and one of now, and day 0
    already pruned: each has a carry-forward that the next prune folds in."""
    for n in range(users):
        user = f"u{n}"
        first = opening_entry(session, user, 10 * (n + 1))
        second = movements.debit(session, user, n + 1, "chatgpt_message").ledger_entry_id
        movements.credit(session, user, 3)
        backdate(session, first, day(0))
        backdate(session, second, day(2))
    session.commit()
    ledger.delete_old_entries_in_chunks(session_factory(), day(1))  # u*'s day-0 entries
    session.commit()


def ledger_rows(session: Session) -> list[tuple[Any, ...]]:
    """Every entry but its id (a carry-forward's id differs between runs)."""
    return sorted(
        tuple(row)
        for row in session.execute(
            text(
                "SELECT user_id, kind, operation_type, tokens_amount, balance_before,"
                " balance_after, metadata::text, created_at FROM ledger_entries"
            )
        )
    )


def test_pruning_in_chunks_equals_the_one_statement_prune(session: Session) -> None:
    many_users_with_old_entries(session, 7)
    expected_count = ledger.count_old_entries(session, day(3)).deleted
    assert expected_count == 7  # each user's day-2 debit; the carry-forwards fold, uncounted
    assert ledger.users_with_old_entries(session, day(3)) == 7
    # The one statement, rolled back: what the chunked prune must leave.
    assert ledger.delete_old_entries(session, day(3)).deleted == 7
    expected = ledger_rows(session)
    session.rollback()

    reported: list[int] = []
    out = ledger.delete_old_entries_in_chunks(
        session_factory(), day(3), users_per_chunk=3, progress=reported.append
    )
    assert out.model_dump() == {"success": True, "deleted": 7}
    assert reported == [3, 3, 1]  # one call per committed transaction
    assert ledger_rows(session) == expected
    assert ledger.count_old_entries(session, day(3)).deleted == 0
    assert ledger.delete_old_entries_in_chunks(session_factory(), day(3)).deleted == 0
    assert ledger.reconcile(session).mismatches == []
    assert_ledger_consistent(session)


def test_a_prune_carries_the_grants_splits_forward(session: Session) -> None:
    """Every change to a grant stays in some entry's split: the pruned entries' splits, summed
    per grant, become the carried_forward entry's (issue 20: they went with the entries)."""
    history(session)
    by_grant = text("SELECT grant_id, sum(amount) FROM entry_grants GROUP BY grant_id")
    before = {g: int(total) for g, total in session.execute(by_grant)}
    ledger.delete_old_entries(session, day(4))
    session.commit()
    after = {g: int(total) for g, total in session.execute(by_grant)}
    assert after == before
    cf = ledger.user_entries(session, "u1").entries[-1]
    assert cf.operation_type == "carried_forward"
    # u1's opening grant: 100 in, 30 and 5 out before day 4.
    assert [g.amount for g in cf.grants] == [65]
    assert ledger.reconcile(session).mismatches == []
    assert_ledger_consistent(session)


def test_reconcile_names_a_grant_whose_remaining_is_not_its_entries_splits(
    session: Session,
) -> None:
    ids = history(session)
    ledger.delete_old_entries(session, day(4))
    session.commit()
    assert ledger.reconcile(session).mismatches == []
    # A split edited behind the worker's back: the balance and the grant's own arithmetic hold.
    session.execute(
        text("UPDATE entry_grants SET amount = amount + 1 WHERE entry_id = :id"),
        {"id": int(ids["u1_image"])},
    )
    session.commit()
    grant = grant_of(session, ids["u1_image"])
    assert [m.model_dump() for m in ledger.reconcile(session).mismatches] == [
        {
            "user_id": "u1",
            "balance": 115,
            "ledger_sum": 115,
            "grants_balance": 115,
            "bad_grants": [grant],
        }
    ]


# --- pruning while others move money ---------------------------------------------------------


def debited_and_refunded(session: Session) -> str:
    """u opens with 100, is debited 100 and refunded 60 of it: balance 60, all before day 5."""
    ids = [opening_entry(session, "u", 100)]
    debit = movements.debit(session, "u", 100, "image_generation").ledger_entry_id
    ids += [debit, movements.refund(session, "u", 60, original_entry_id=debit).ledger_entry_id]
    for n, entry_id in enumerate(ids):
        backdate(session, entry_id, day(n))
    session.commit()
    return debit


def test_a_refund_waiting_on_a_prune_of_its_entry_is_refused(clean_db: None) -> None:
    """Issue 20: the refund read the debit the prune was deleting, waited on the cap row the
    prune deleted, then made a fresh one: 160 refunded against a debit of 100."""
    with session_factory()() as s:
        debit = debited_and_refunded(s)
    with session_factory()() as pruner:
        assert ledger.delete_old_entries(pruner, day(5)).deleted == 3
        with blocked(lambda: attempt(movements.refund, "u", 100, original_entry_id=debit)) as r:
            pruner.commit()
        outcome = r.result()
    assert isinstance(outcome, DomainError), outcome
    assert outcome.code == "ENTRY_NOT_FOUND"
    with session_factory()() as s:
        assert accounts.get_balance(s, "u").tokens_balance == 60
        assert s.execute(text("SELECT count(*) FROM refund_totals")).scalar_one() == 0
        assert_ledger_consistent(s)


def test_a_prune_waiting_on_a_refund_removes_its_cap_with_the_entry(clean_db: None) -> None:
    with session_factory()() as s:
        debit = debited_and_refunded(s)
    with session_factory()() as refunder:
        movements.refund(refunder, "u", 30, original_entry_id=debit)
        with blocked(lambda: attempt(ledger.delete_old_entries, day(5))) as prune:
            refunder.commit()
        pruned = prune.result()
    assert isinstance(pruned, DeletedOut) and pruned.deleted == 3
    with session_factory()() as s:
        assert s.execute(text("SELECT count(*) FROM refund_totals")).scalar_one() == 0
        assert accounts.get_balance(s, "u").tokens_balance == 90
        assert_ledger_consistent(s)


def test_overlapping_prunes_leave_one_carried_forward_entry(clean_db: None) -> None:
    """Issue 20: the second prune skipped what the first deleted and wrote a carry-forward of
    its own from 0, beside the first's: two starts in one user's history."""
    with session_factory()() as s:
        history(s)
    with session_factory()() as first:
        ledger.delete_old_entries(first, day(4))
        with blocked(lambda: attempt(ledger.delete_old_entries, day(7))) as second:
            first.commit()
        assert isinstance(second.result(), DeletedOut)
    with session_factory()() as s:
        assert carried(s) == [
            ("u1", "carried_forward", 125, 0, 125, day(6)),
            ("u2", "carried_forward", 30, 0, 30, day(4)),
        ]
        assert ledger.reconcile(s).mismatches == []
        assert_ledger_consistent(s)


def test_count_old_entries_changes_nothing(session: Session) -> None:
    history(session)
    before = session.execute(text("SELECT * FROM ledger_entries ORDER BY id")).all()
    assert ledger.count_old_entries(session, day(4)).deleted == 4
    assert ledger.users_with_old_entries(session, day(4)) == 2
    assert session.execute(text("SELECT * FROM ledger_entries ORDER BY id")).all() == before
    assert ledger.delete_old_entries(session, day(4)).deleted == 4


# --- reconciliation --------------------------------------------------------------------------


def test_reconcile_reports_only_corrupted_balances(session: Session) -> None:
    history(session)
    accounts.open_account(session, "empty")
    session.commit()
    assert ledger.reconcile(session).model_dump() == {
        "success": True,
        "checked": 3,
        "mismatches": [],
    }
    session.execute(
        text("UPDATE accounts SET tokens_balance = tokens_balance + 7 WHERE user_id = 'u1'")
    )
    session.execute(text("UPDATE accounts SET tokens_balance = -3 WHERE user_id = 'empty'"))
    session.commit()
    assert ledger.reconcile(session).model_dump() == {
        "success": True,
        "checked": 3,
        "mismatches": [
            {
                "user_id": "empty",
                "balance": -3,
                "ledger_sum": 0,
                "grants_balance": 0,
                "bad_grants": [],
            },
            {
                "user_id": "u1",
                "balance": 122,
                "ledger_sum": 115,
                "grants_balance": 115,
                "bad_grants": [],
            },
        ],
    }
    assert ledger.reconcile(session, "u1").model_dump() == {
        "success": True,
        "checked": 1,
        "mismatches": [
            {
                "user_id": "u1",
                "balance": 122,
                "ledger_sum": 115,
                "grants_balance": 115,
                "bad_grants": [],
            }
        ],
    }
    assert ledger.reconcile(session, "u2").model_dump() == {
        "success": True,
        "checked": 1,
        "mismatches": [],
    }
    assert ledger.reconcile(session, "nobody").model_dump() == {
        "success": True,
        "checked": 0,
        "mismatches": [],
    }


def test_reconcile_sees_a_lost_ledger_entry(session: Session) -> None:
    ids = history(session)
    bought = grant_of(session, ids["u1_credit"])
    session.execute(text("DELETE FROM ledger_entries WHERE operation_type = 'purchase'"))
    session.commit()
    # The grant the purchase made is no longer accounted for by any entry's split either.
    assert ledger.reconcile(session).mismatches[0].model_dump() == {
        "user_id": "u1",
        "balance": 115,
        "ledger_sum": 65,
        "grants_balance": 115,
        "bad_grants": [bought],
    }


def test_a_history_page_read_while_a_grant_is_due_shows_its_expiry(session: Session) -> None:
    """The page is read with the due-grant probe in one statement; a due grant is expired
    before the page the reader gets, at offset 0 and past the end of the history alike."""
    accounts.open_account(session, "u1", initial_balance=0)
    movements.credit(session, "u1", 40, "purchase", grant_kind="promo")
    session.execute(text("UPDATE grants SET expires_at = clock_timestamp() - interval '1 second'"))
    session.commit()
    beyond = ledger.user_entries(session, "u1", offset=10)
    assert beyond.entries == []
    session.commit()
    assert session.execute(text("SELECT status FROM grants")).scalar_one() == "expired"
    session.execute(
        text(
            "UPDATE grants SET status = 'active', remaining = 40, expired = 0, ended_at = NULL;"
            " DELETE FROM entry_grants WHERE amount < 0;"
            " DELETE FROM ledger_entries WHERE kind = 'expiry';"
            " UPDATE accounts SET tokens_balance = 40"
        )
    )
    session.commit()
    page = ledger.user_entries(session, "u1")
    assert [(e.operation_type, e.tokens_amount) for e in page.entries] == [
        ("expiry", -40),
        ("purchase", 40),
    ]
    # Nothing due any more: the one statement is the whole read.
    assert ledger.user_entries(session, "u1").entries == page.entries
    assert_ledger_consistent(session)


def test_prunes_racing_refunds_captures_and_debits_keep_every_invariant(clean_db: None) -> None:
    """Random interleavings: eight threads debit, refund against earlier debits, reserve and
    capture, and prune everything up to the database's clock, on three users. Never more
    refunded of a debit than it charged; a refund of a pruned debit is ENTRY_NOT_FOUND; every
    history starts at 0 and chains; every grant is the sum of its entries' splits; no deadlock."""
    users = ["u0", "u1", "u2"]
    with session_factory()() as s:
        for u in users:
            accounts.open_account(s, u, initial_balance=5_000)
        s.commit()
    debits: list[tuple[str, str, int]] = []  # (user, entry id, charged)
    refunded: dict[str, int] = defaultdict(int)
    guard = threading.Lock()

    def refund(rng: random.Random) -> None:
        with guard:
            if not debits:
                return
            user, entry, charged = rng.choice(debits)
        amount = rng.randint(1, charged)
        out = attempt(movements.refund, user, amount, original_entry_id=entry)
        if isinstance(out, DomainError):
            assert out.code in ("ENTRY_NOT_FOUND", "REFUND_EXCEEDS_ORIGINAL"), out
            return
        with guard:
            refunded[entry] += amount

    def work(n: int) -> int:
        rng = random.Random(n)
        for _ in range(50):
            user, roll = rng.choice(users), rng.random()
            if roll < 0.3:
                out = attempt(movements.debit, user, rng.randint(1, 40), "image_generation", True)
                assert isinstance(out, MovementOut), out
                with guard:
                    debits.append((user, out.ledger_entry_id, -out.amount))
            elif roll < 0.6:
                refund(rng)
            elif roll < 0.8:
                held = attempt(reservations.reserve, user, rng.randint(1, 30))
                assert isinstance(held, ReserveOut), held
                amount = rng.randint(1, held.amount)
                captured = attempt(reservations.capture, held.reservation_id, amount)
                assert isinstance(captured, CaptureOut), captured
            else:
                with session_factory()() as s:
                    now = clock.db_now(s)
                assert isinstance(attempt(ledger.delete_old_entries, now), DeletedOut)
        return n

    run_in_threads(8, work)
    charged = {entry: amount for _, entry, amount in debits}
    assert {e: t for e, t in refunded.items() if t > charged[e]} == {}
    with session_factory()() as s:
        assert ledger.reconcile(s).mismatches == []
        assert_ledger_consistent(s)
        starts = s.execute(
            text(
                "SELECT user_id, count(*) FROM ledger_entries WHERE kind = 'carried_forward'"
                " GROUP BY user_id HAVING count(*) > 1"
            )
        ).all()
        assert starts == []
        caps = s.execute(
            text("SELECT entry_id, charged, refunded FROM refund_totals WHERE refunded > charged")
        ).all()
        assert caps == []
