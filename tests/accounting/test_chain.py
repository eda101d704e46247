"""accounting/chain.py and the hash chain under it (sql/ledger/tokens_chain.sql and friends):
the chain every insert writes, checked against docs/verify_ledger.py (plain Python, the
contract's definition), and ``ledger.verify`` against each kind of tampering."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting import accounts, chain, ledger, movements
from models.schemas import Broken
from tests.support import ROOT, verify_ledger

SCRIPT = ROOT / "docs" / "verify_ledger.py"


def entries(session: Session, user_id: str) -> list[dict[str, Any]]:
    """Every entry of ``user_id`` as ledger.user_entries returns it (JSON), oldest first."""
    page = ledger.user_entries(session, user_id, limit=1000)
    return [e.model_dump(mode="json") for e in reversed(page.entries)]


def history(session: Session) -> None:
    """Two users with one of each kind of movement, metadata of every JSON shape."""
    accounts.open_account(session, "u1", initial_balance=100)
    accounts.open_account(session, "u2", initial_balance=5)
    meta = {"é": 'ü\n"q"', "n": [1, 2.5, None, True], "nested": {"b": 1, "a": {}}}
    debit = movements.debit(session, "u1", 30, "image_generation", metadata=meta)
    movements.charge(session, "u1", "chatgpt_message", idempotency_key="k1")
    movements.refund(session, "u1", 10, original_entry_id=debit.ledger_entry_id)
    movements.credit(session, "u1", 50, metadata={"float": 1e-7, "big": 10**30})
    movements.debit(session, "u2", 9, "image_generation", allow_overdraft=True)
    session.commit()


def verified(session: Session, user_id: str | None = None) -> list[Broken]:
    return chain.verify(session, user_id).broken


def test_each_entry_chains_as_the_contract_defines_it(session: Session) -> None:
    history(session)
    for user_id in ("u1", "u2"):
        listed = entries(session, user_id)
        prev = "0" * 64
        for entry in listed:
            assert entry["prev_hash"] == prev
            assert entry["hash"] == verify_ledger.entry_hash(prev, entry)
            prev = entry["hash"]
        assert verify_ledger.problems(listed) == []
    out = chain.verify(session)
    assert (out.checked, out.broken) == (7, [])


def test_a_worked_example(session: Session) -> None:
    """The closing note's example: an entry and its hash, by hand."""
    accounts.open_account(session, "alice", initial_balance=100)
    session.commit()
    (entry,) = entries(session, "alice")
    fields = {name: entry.get(name) for name in verify_ledger.FIELDS}
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert body.startswith('{"balance_after":100,"balance_before":0,"created_at":"')
    assert entry["prev_hash"] == "0" * 64
    import hashlib

    assert entry["hash"] == hashlib.sha256(f"{'0' * 64}\n{body}".encode()).hexdigest()


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_characters="\x00", exclude_categories=["Cs"])),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(
                st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=6
            ),
            inner,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(value=json_values)
def test_the_canonical_json_is_pythons(session: Session, value: Any) -> None:
    """Whatever JSON a producer sends, the database writes it as Python's json.dumps writes
    the value read back (keys by code point, escapes, ints, floats in repr's form)."""
    row = session.execute(
        text("SELECT CAST(:j AS jsonb) AS v, tokens_canonical(CAST(:j AS jsonb)) AS c"),
        {"j": json.dumps(value)},
    ).one()
    expected = json.dumps(row.v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert row.c == expected


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(values=st.lists(json_values, max_size=6))
def test_many_values_written_at_once_are_written_as_one_by_one(
    session: Session, values: list[Any]
) -> None:
    """ledger.verify writes a page's metadata with one call of tokens_canonical_objects (one
    sort of every member of every value): each comes out as Python writes it, in its place."""
    rows = session.execute(
        text(
            "SELECT o.n, o.canonical, (CAST(:js AS jsonb[]))[o.n] AS v"
            " FROM tokens_canonical_objects(CAST(:js AS jsonb[])) AS o ORDER BY o.n"
        ),
        {"js": [json.dumps(v) for v in values]},
    ).all()
    assert [r.n for r in rows] == list(range(1, len(values) + 1))
    for r in rows:
        assert r.canonical == json.dumps(
            r.v, sort_keys=True, separators=(",", ":"), ensure_ascii=False
        )


def test_the_floats_python_writes_differently_from_postgresql(session: Session) -> None:
    for value in (1e15, 1.5e15, 1234567890123456.8, 1.0, -0.0, 1e16, 1e-5, 0.0001, 5e-324, 1e22):
        row = session.execute(
            text("SELECT CAST(:j AS jsonb) AS v, tokens_canonical(CAST(:j AS jsonb)) AS c"),
            {"j": json.dumps(value)},
        ).one()
        assert row.c == json.dumps(row.v), value


def tamper(session: Session, sql: str, **params: Any) -> None:
    session.execute(text(sql), params)
    session.commit()


def entry_ids(session: Session, user_id: str) -> list[str]:
    return [e["id"] for e in entries(session, user_id)]


def test_an_amount_changed_is_reported(session: Session) -> None:
    history(session)
    target = entry_ids(session, "u1")[1]
    tamper(
        session,
        "UPDATE ledger_entries SET tokens_amount = tokens_amount - 1,"
        " balance_before = balance_before + 1 WHERE id = :id",
        id=int(target),
    )
    assert Broken(user_id="u1", entry_id=target, reason="hash") in verified(session)
    assert verify_ledger.problems(entries(session, "u1"))[0] == ("u1", target, "hash")


def test_an_entry_deleted_is_reported(session: Session) -> None:
    history(session)
    ids = entry_ids(session, "u1")
    tamper(session, "DELETE FROM ledger_entries WHERE id = :id", id=int(ids[2]))
    broken = verified(session, "u1")
    assert Broken(user_id="u1", entry_id=ids[3], reason="prev_hash") in broken
    assert any(b.reason == "balance" for b in broken)


def test_an_entry_inserted_is_reported(session: Session) -> None:
    history(session)
    ids = entry_ids(session, "u1")
    at = session.execute(
        text("SELECT created_at FROM ledger_entries WHERE id = :id"), {"id": int(ids[1])}
    ).scalar_one()
    # Between two entries, balance fields made to fit; the trigger chains it to the user's last.
    tamper(
        session,
        "INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount,"
        " balance_before, balance_after, metadata, created_at)"
        " SELECT user_id, 'credit', 'purchase', 0, balance_after, balance_after, '{}',"
        " created_at + interval '1 microsecond' FROM ledger_entries WHERE id = :id",
        id=int(ids[1]),
    )
    inserted = str(
        session.execute(
            text("SELECT max(id) FROM ledger_entries WHERE created_at > :at AND tokens_amount = 0"),
            {"at": at},
        ).scalar_one()
    )
    broken = verified(session, "u1")
    assert Broken(user_id="u1", entry_id=inserted, reason="prev_hash") in broken
    assert Broken(user_id="u1", entry_id=ids[2], reason="prev_hash") in broken


def test_two_entries_swapped_are_reported(session: Session) -> None:
    history(session)
    ids = entry_ids(session, "u1")
    a, b = int(ids[1]), int(ids[2])
    tamper(
        session,
        "UPDATE ledger_entries e SET created_at = o.created_at FROM ledger_entries o"
        " WHERE (e.id, o.id) IN ((:a, :b), (:b, :a))",
        a=a,
        b=b,
    )
    reasons = {(x.entry_id, x.reason) for x in verified(session, "u1")}
    assert (str(b), "prev_hash") in reasons


def test_a_balance_field_edited_is_reported(session: Session) -> None:
    history(session)
    target = entry_ids(session, "u2")[1]
    tamper(
        session,
        "UPDATE ledger_entries SET balance_before = balance_before + 1,"
        " balance_after = balance_after + 1 WHERE id = :id",
        id=int(target),
    )
    assert verified(session) == [
        Broken(user_id="u2", entry_id=target, reason="hash"),
        Broken(user_id="u2", entry_id=target, reason="balance"),
    ]


def test_metadata_edited_is_reported(session: Session) -> None:
    history(session)
    target = entry_ids(session, "u1")[1]
    tamper(
        session,
        "UPDATE ledger_entries SET metadata = metadata || '{\"x\": 1}' WHERE id = :id",
        id=int(target),
    )
    assert verified(session) == [Broken(user_id="u1", entry_id=target, reason="hash")]
    assert [p[2] for p in verify_ledger.problems(entries(session, "u1"))] == ["hash"]


def test_a_balance_changed_alone_is_reported(session: Session) -> None:
    history(session)
    tamper(session, "UPDATE accounts SET tokens_balance = tokens_balance + 5 WHERE user_id = 'u2'")
    (broken,) = verified(session)
    assert (broken.user_id, broken.reason) == ("u2", "balance")


def test_a_prune_leaves_a_checkpoint_the_chain_continues_from(session: Session) -> None:
    history(session)
    before = entries(session, "u1")
    cutoff = datetime.fromisoformat(before[3]["created_at"])
    ledger.delete_old_entries(session, cutoff)
    session.commit()
    movements.debit(session, "u1", 1, "image_generation")
    session.commit()
    after = entries(session, "u1")
    checkpoint = after[0]
    assert checkpoint["operation_type"] == "carried_forward"
    assert checkpoint["prev_hash"] == "0" * 64
    assert checkpoint["hash"] == before[2]["hash"]
    assert after[1]["prev_hash"] == before[2]["hash"]
    assert verified(session) == []
    assert verify_ledger.problems(after) == []
    # A second prune folds the first checkpoint in; the chain still verifies.
    ledger.delete_old_entries(session, datetime.now(UTC) + timedelta(seconds=1))
    session.commit()
    assert verified(session) == []


def test_the_backfill_chains_entries_written_before_the_chain(session: Session) -> None:
    history(session)
    written = {e["id"]: (e["prev_hash"], e["hash"]) for e in entries(session, "u1")}
    session.execute(text("ALTER TABLE ledger_entries ALTER COLUMN hash DROP NOT NULL"))
    session.execute(text("ALTER TABLE ledger_entries ALTER COLUMN prev_hash DROP NOT NULL"))
    session.execute(text("UPDATE ledger_entries SET hash = NULL, prev_hash = NULL"))
    after = None
    while (
        after := session.execute(
            text("SELECT tokens_chain_backfill(:after, 1)"), {"after": after}
        ).scalar_one()
    ) is not None:
        pass
    again = {e["id"]: (e["prev_hash"], e["hash"]) for e in entries(session, "u1")}
    session.rollback()
    assert again == written


def test_the_script_checks_an_export(session: Session, tmp_path: Path) -> None:
    history(session)
    export = tmp_path / "entries.json"
    listed = entries(session, "u1") + entries(session, "u2")
    export.write_text(json.dumps(listed))
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(export)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "7 entries checked, 0 problems" in run.stdout
    listed[3]["tokens_amount"] += 1
    export.write_text("\n".join(json.dumps(e) for e in listed))
    run = subprocess.run(
        [sys.executable, str(SCRIPT), str(export)], capture_output=True, text=True, check=False
    )
    assert run.returncode == 1
    assert f"u1 {listed[3]['id']}: hash" in run.stdout


def test_a_pool_has_one_chain_with_its_members_entries(session: Session) -> None:
    accounts.open_account(session, "pool", initial_balance=100)
    accounts.open_account(session, "team", parent_id="pool")
    accounts.open_account(session, "member", parent_id="team")
    movements.debit(session, "member", 10, "image_generation")
    movements.debit(session, "pool", 5, "image_generation")
    session.commit()
    listed = entries(session, "pool")
    assert [e["spent_by"] for e in listed] == [None, "member", None]
    assert listed[1]["prev_hash"] == listed[0]["hash"]
    assert verify_ledger.problems(listed) == []
    assert verified(session) == []
    # spent_by is hashed: crediting the pool's own spend to a member breaks the chain.
    tamper(
        session,
        "UPDATE ledger_entries SET spent_by = 'team' WHERE id = :id",
        id=int(listed[1]["id"]),
    )
    assert verified(session) == [Broken(user_id="pool", entry_id=listed[1]["id"], reason="hash")]


def test_pages_checked_on_several_connections_report_as_one(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full check split in pages of 2 users, on 1 and on 3 connections: the same count and
    the same problems, by user then entry, cut at the listed maximum."""
    monkeypatch.setattr(chain, "USERS_PER_STATEMENT", 2)
    monkeypatch.setattr(chain, "MAX_BROKEN_LISTED", 4)
    users = [f"p{n}" for n in range(9)]
    for user in users:
        accounts.open_account(session, user, initial_balance=50)
        for n in range(3):
            movements.debit(session, user, 1, "image_generation", metadata={"n": n, "u": user})
    session.commit()
    for user in ("p1", "p4", "p8"):  # pages 1, 3 and 5: two problems each, 6 in all
        first, second = entry_ids(session, user)[1:3]
        tamper(session, "UPDATE ledger_entries SET metadata = '{}' WHERE id = :id", id=int(first))
        tamper(
            session,
            "UPDATE ledger_entries SET metadata = metadata || '{\"x\": 1}' WHERE id = :id",
            id=int(second),
        )
    one = chain.verify(session, connections=1)
    many = chain.verify(session, connections=3)
    assert one == many
    assert one.checked == 9 * 4
    assert [(b.user_id, b.reason) for b in one.broken] == [("p1", "hash")] * 2 + [
        ("p4", "hash")
    ] * 2


def test_a_page_of_more_entries_than_one_chunk(session: Session) -> None:
    """tokens_verify writes a page's metadata 10,000 entries at a time: a user with more is
    checked whole, and a problem on either side of a chunk's edge is placed on its entry."""
    entries_made = 10_050
    session.execute(
        text(
            "INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, tokens_spent,"
            " debt, created_at, updated_at)"
            " VALUES ('big', 'Gift', :n, 0, 0, 0, now(), now())"
        ),
        {"n": entries_made},
    )
    # Written through the chain's trigger, which sees the statement's earlier rows.
    session.execute(
        text(
            "INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount,"
            " balance_before, balance_after, metadata, created_at)"
            " SELECT 'big', 'credit', 'purchase', 1, n - 1, n,"
            " jsonb_build_object('n', n, 'b', 'x'), now() + n * interval '1 millisecond'"
            " FROM generate_series(1, :n) AS n"
        ),
        {"n": entries_made},
    )
    session.commit()
    assert chain.verify(session) == chain.verify(session, "big")
    assert (chain.verify(session).checked, chain.verify(session).broken) == (entries_made, [])
    ids = (
        session.execute(
            text("SELECT id FROM ledger_entries WHERE user_id = 'big' ORDER BY created_at, id")
        )
        .scalars()
        .all()
    )
    for place in (9_999, 10_000, 10_001, entries_made):  # 1-based; a chunk ends at 10,000
        tamper(
            session,
            "UPDATE ledger_entries SET metadata = jsonb_set(metadata, '{b}', '\"y\"')"
            " WHERE id = :id",
            id=ids[place - 1],
        )
    out = chain.verify(session)
    assert out.checked == entries_made
    assert out.broken == [
        Broken(user_id="big", entry_id=str(ids[place - 1]), reason="hash")
        for place in (9_999, 10_000, 10_001, entries_made)
    ]
