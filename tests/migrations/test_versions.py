"""migrations/: the schema the migrations build is the one the models describe, and each data
migration carries existing rows over."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.command import downgrade
from alembic.migration import MigrationContext
from sqlalchemy import DateTime, Engine, bindparam, create_engine, text
from sqlalchemy.orm import Session

from accounting import accounts, chain, movements, outbox
from accounting.ledger import reconcile
from migrations.partitions import include_name, include_object
from models.tables import Base
from tests.accounting.test_against_oracle import RECHAIN
from tests.devenv import PG_ADMIN_URL
from tests.layout import month_start
from tests.support import assert_ledger_consistent
from worker.db import get_engine
from worker.migrate import alembic_config, upgrade


@pytest.fixture
def blank_database() -> Iterator[str]:
    """A new, empty PostgreSQL database of its own (the migrations are the test)."""
    name = f"tokens_migrations_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = get_engine().url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def engine_for(url: str) -> Engine:
    return create_engine(url)


def test_the_migrated_schema_is_the_models_schema() -> None:
    with get_engine().connect() as conn:
        opts = {"include_name": include_name, "include_object": include_object}
        context = MigrationContext.configure(conn, opts=opts)
        diffs = compare_metadata(context, Base.metadata)
    assert diffs == []


def test_0002_carries_refunds_into_refund_totals(blank_database: str) -> None:
    upgrade(blank_database, "0001")
    engine = engine_for(blank_database)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    """
                    INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved,
                                          tokens_spent, created_at, updated_at)
                    VALUES ('u', 'Gift', 95, 0, 15, now(), now());
                    INSERT INTO ledger_entries (id, user_id, kind, operation_type, tokens_amount,
                        balance_before, balance_after, original_entry_id, metadata, created_at)
                    VALUES (1, 'u', 'adjustment', 'adjustment', 100, 0, 100, NULL, '{}', now()),
                           (2, 'u', 'debit', 'image_generation', -30, 100, 70, NULL, '{}', now()),
                           (3, 'u', 'refund', 'refund', 10, 70, 80, 2, '{}', now()),
                           (4, 'u', 'refund', 'refund', 5, 80, 85, 2, '{}', now()),
                           (5, 'u', 'charge', 'image_generation', -10, 85, 75, NULL, '{}', now()),
                           (6, 'u', 'refund', 'refund', 20, 75, 95, NULL, '{}', now());
                    """
                )
            )
        upgrade(blank_database)
        with engine.connect() as conn:
            caps = conn.execute(
                text("SELECT entry_id, user_id, charged, refunded FROM refund_totals")
            ).all()
        assert [tuple(c) for c in caps] == [(2, "u", 30, 15)]
    finally:
        engine.dispose()


# --- 0004: balances become grants --------------------------------------------------------------

T0 = datetime(2026, 10, 1, 12, 0, tzinfo=UTC)
# user: (balance, ledger amounts that chain to it, amounts of active holds, ended holds' status)
V1_ACCOUNTS: dict[str, tuple[int, list[int], list[int], list[str]]] = {
    "positive": (100, [150, -50], [20, 10], ["captured", "released", "expired"]),
    "zero": (0, [40, -40], [], ["released"]),
    "negative": (-25, [10, -35], [], []),
    # v1 let a debit overdraw under a live hold: the hold (40) outgrew the balance (5).
    "overheld": (5, [60, -55], [40], []),
    "negative_held": (-10, [20, -30], [15], ["captured"]),
    "untouched": (0, [], [], []),
}
# What 0004 must make of them: the grant GREATEST(balance, reserved), held = reserved, and debt.
EXPECTED = {  # user: (grant amount or None, held, debt)
    "positive": (100, 30, 0),
    "zero": (None, 0, 0),
    "negative": (None, 0, 25),
    "overheld": (40, 40, 35),
    "negative_held": (15, 15, 25),
    "untouched": (None, 0, 0),
}


def fill_v1(engine: Engine) -> None:
    """Accounts, chained ledger entries and live and ended reservations, as v1 wrote them."""
    at = bindparam("t", type_=DateTime(timezone=True))
    account = text(
        """
        INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, tokens_spent,
                              created_at, updated_at)
        VALUES (:u, 'Gift', :balance, :reserved, 0, :t, :t)
        """
    ).bindparams(at)
    entry = text(
        """
        INSERT INTO ledger_entries (user_id, kind, operation_type, tokens_amount, balance_before,
                                    balance_after, metadata, created_at)
        VALUES (:u, :kind, :kind, :amount, :before, :after, '{}', :t)
        """
    ).bindparams(at)
    reservation = text(
        """
        INSERT INTO reservations (id, user_id, amount, operation_type, status, expires_at,
                                  created_at, metadata)
        VALUES (:id, :u, :amount, 'image_generation', :status, :t, :t, '{}')
        """
    ).bindparams(at)
    tick = 0
    with engine.begin() as conn:
        for user, (balance, amounts, holds, ended) in V1_ACCOUNTS.items():
            row = {"u": user, "balance": balance, "reserved": sum(holds), "t": T0}
            conn.execute(account, row)
            running = 0
            for amount in amounts:
                tick += 1
                kind = "adjustment" if amount > 0 else "debit"
                conn.execute(
                    entry,
                    {
                        "u": user,
                        "kind": kind,
                        "amount": amount,
                        "before": running,
                        "after": running + amount,
                        "t": T0 + timedelta(seconds=tick),
                    },
                )
                running += amount
            assert running == balance
            statuses = ["active"] * len(holds) + ended
            for i, (status, amount) in enumerate(
                zip(statuses, holds + [7] * len(ended), strict=True)
            ):
                conn.execute(
                    reservation,
                    {
                        "id": f"{user}-{i}",
                        "u": user,
                        "amount": amount,
                        "status": status,
                        "t": T0 + timedelta(hours=1),
                    },
                )


def assert_converted(engine: Engine) -> None:
    """Each v1 balance became its grant, debt and holds, and every invariant holds but the
    entry splits (the migrated grants have no creating entry)."""
    with Session(engine) as session:
        grants = session.execute(
            text(
                """
                SELECT user_id, kind, amount, remaining, held, spent, expired, returned,
                       priority, expires_at, status, id FROM grants ORDER BY user_id
                """
            )
        ).all()
        made = {g.user_id: g for g in grants}
        assert len(made) == len(grants), "one grant per user"
        accounts = session.execute(
            text("SELECT user_id, tokens_balance, tokens_reserved, debt FROM accounts")
        ).all()
        for user, balance, reserved, debt in accounts:
            amount, held, expected_debt = EXPECTED[user]
            assert (balance, reserved, debt) == (V1_ACCOUNTS[user][0], held, expected_debt), user
            g = made.get(user)
            if amount is None:
                assert g is None, user
                continue
            assert g is not None, user
            assert (g.kind, g.amount, g.remaining, g.held) == ("adjustment", amount, amount, held)
            assert (g.spent, g.expired, g.returned, g.priority) == (0, 0, 0, 50)
            assert (g.expires_at, g.status) == (None, "active")
            assert debt == amount - balance
        backing = session.execute(
            text(
                """
                SELECT r.id, r.amount, rg.amount, g.user_id = r.user_id
                FROM reservations r
                LEFT JOIN reservation_grants rg ON rg.reservation_id = r.id
                LEFT JOIN grants g ON g.id = rg.grant_id
                WHERE r.status = 'active' ORDER BY r.id
                """
            )
        ).all()
        assert [b[0] for b in backing] == [
            "negative_held-0",
            "overheld-0",
            "positive-0",
            "positive-1",
        ]
        assert all(r_amount == rg_amount and mine for _, r_amount, rg_amount, mine in backing)
        ended_held = session.execute(
            text(
                """
                SELECT COUNT(*) FROM reservation_grants rg
                JOIN reservations r ON r.id = rg.reservation_id WHERE r.status <> 'active'
                """
            )
        ).scalar_one()
        assert ended_held == 0
        assert_ledger_consistent(session, entry_splits=False)
        report = reconcile(session)
        assert report.checked == len(V1_ACCOUNTS)
        assert report.mismatches == []


def migrate_0003_to_head_and_back(url: str) -> None:
    upgrade(url, "0003")
    engine = create_engine(url)
    try:
        fill_v1(engine)
        upgrade(url)
        assert_converted(engine)
        downgrade(alembic_config(url), "0003")
        with engine.connect() as conn:
            back = conn.execute(
                text("SELECT user_id, tokens_balance, tokens_reserved FROM accounts")
            ).all()
        assert {u: (b, r) for u, b, r in back} == {
            u: (v[0], sum(v[2])) for u, v in V1_ACCOUNTS.items()
        }
        upgrade(url)
        assert_converted(engine)
    finally:
        engine.dispose()


def test_0004_turns_postgresql_balances_into_grants_and_debt(blank_database: str) -> None:
    migrate_0003_to_head_and_back(blank_database)


@pytest.mark.parametrize(
    ("revision", "made", "kept"),
    [
        (
            "0008",
            (
                *("tokens_credit", "tokens_reset", "tokens_claim", "tokens_lock"),
                *("tokens_grant", "tokens_burn", "tokens_write"),
            ),
            ("tokens_spend",),
        ),
        ("0009", ("tokens_capture", "tokens_expire_due", "tokens_json_bytes"), ("tokens_lock",)),
        (
            "0010",
            ("tokens_reserve", "tokens_release"),
            ("tokens_claim", "tokens_lock", "tokens_expire_due"),
        ),
        (
            "0036",
            (
                "tokens_carry",
                "tokens_ledger_partitions",
                "tokens_ledger_months",
                "tokens_prune_months",
            ),
            ("tokens_prune", "tokens_write", "tokens_refund", "tokens_entry_hash"),
        ),
        ("0037", ("tokens_page",), ("tokens_ledger_partition",)),
        ("0039", ("tokens_grant_due",), ("tokens_expire_due", "tokens_page")),
        (
            "0040",
            ("tokens_event_done", "tokens_prune_event_months", "tokens_events_partition"),
            ("tokens_ledger_months", "tokens_ledger_partitions", "tokens_event"),
        ),
    ],
)
def test_a_function_migration_creates_its_functions_and_drops_only_them(
    blank_database: str, revision: str, made: tuple[str, ...], kept: tuple[str, ...]
) -> None:
    """Each migration from 0008 on creates its functions; its downgrade drops them and leaves
    the earlier ones it builds on."""
    count = text("SELECT count(*) FROM pg_proc WHERE proname = ANY(:names)")
    upgrade(blank_database, revision)
    engine = engine_for(blank_database)
    try:
        with engine.connect() as conn:
            assert conn.execute(count, {"names": list(made)}).scalar_one() == len(made)
        downgrade(alembic_config(blank_database), f"{int(revision) - 1:04d}")
        with engine.connect() as conn:
            assert conn.execute(count, {"names": list(made)}).scalar_one() == 0
            assert conn.execute(count, {"names": list(kept)}).scalar_one() == len(kept)
    finally:
        engine.dispose()


def test_0011_puts_spend_and_refund_over_the_helpers_and_back(blank_database: str) -> None:
    """0011 rewrites tokens_spend and tokens_refund over 0008's helpers; its downgrade restores
    0005's and 0007's own copies. Each version runs (plpgsql finds a wrong name only then)."""
    sources = text(
        "SELECT proname, prosrc FROM pg_proc WHERE proname IN ('tokens_spend', 'tokens_refund')"
    )
    calls = (
        "SELECT status FROM tokens_spend('nobody', 'k', 'd', 'debit', 'x', 1, false, '{}')",
        "SELECT status FROM tokens_refund('nobody', 'k', 'd', NULL, 1, '{}')",
    )

    def helpers_used(engine: Engine) -> dict[str, bool]:
        with engine.connect() as conn:  # rolls back what the calls claimed
            for call in calls:
                assert conn.execute(text(call)).scalar_one() == "not_found"
            found = conn.execute(sources).all()
        return {name: "tokens_claim(" in src and "tokens_lock(" in src for name, src in found}

    upgrade(blank_database, "0011")
    engine = engine_for(blank_database)
    try:
        assert helpers_used(engine) == {"tokens_spend": True, "tokens_refund": True}
        downgrade(alembic_config(blank_database), "0010")
        assert helpers_used(engine) == {"tokens_spend": False, "tokens_refund": False}
    finally:
        engine.dispose()


# --- 0036: the ledger by month ----------------------------------------------------------------

LEDGER_ROWS = text(
    "SELECT id, user_id, kind, tokens_amount, balance_after, created_at, prev_hash, hash"
    " FROM ledger_entries ORDER BY id"
)
SPLIT_ROWS = text("SELECT entry_id, grant_id, amount, seq FROM entry_grants ORDER BY 1, 2")
CAP_ROWS = text("SELECT entry_id, charged, refunded FROM refund_totals ORDER BY 1")


def test_0036_partitions_the_ledger_in_place_and_back(blank_database: str) -> None:
    """Entries written at 0035 (two moved back months, one stamped next month by a clock ahead)
    become the first partition, up to the month after the newest; splits and refund caps get
    their entry's date; the chains, balances and grants still verify, a movement after it
    works; the downgrade gives back the same rows in plain tables."""
    upgrade(blank_database, "0035")
    engine = engine_for(blank_database)
    try:
        with Session(engine) as s, s.begin():
            accounts.open_account(s, "a", initial_balance=100)
            accounts.open_account(s, "b", initial_balance=40)
            old = int(movements.debit(s, "a", 30, "image_generation").ledger_entry_id)
            movements.refund(s, "a", 10, original_entry_id=old)
            s.execute(
                text("UPDATE ledger_entries SET created_at = created_at - interval '70 days'")
            )
            s.execute(RECHAIN)
            ahead = month_start(s.connection(), 1) + timedelta(days=5)
            s.execute(text("UPDATE accounts SET updated_at = :t WHERE user_id = 'b'"), {"t": ahead})
            movements.debit(s, "b", 5, "image_generation")
        with engine.connect() as conn:
            before = [conn.execute(q).all() for q in (LEDGER_ROWS, SPLIT_ROWS, CAP_ROWS)]
        upgrade(blank_database)
        with Session(engine) as s:
            parts = s.execute(text("SELECT * FROM tokens_ledger_partitions()")).all()
            assert parts[0].name == "ledger_entries_before"
            # Up to the month after the entry stamped ahead; then the months to three ahead.
            assert parts[0].upper == month_start(s.connection(), 2)
            assert [p.lower for p in parts[1:-1]] == [
                month_start(s.connection(), 2),
                month_start(s.connection(), 3),
            ]
            assert parts[-1].name == "ledger_entries_after"
            where = (
                s.execute(text("SELECT DISTINCT tableoid::regclass::text FROM ledger_entries"))
                .scalars()
                .all()
            )
            assert where == ["ledger_entries_before"]
            after = [s.execute(q).all() for q in (LEDGER_ROWS, SPLIT_ROWS, CAP_ROWS)]
            assert after == before
            stray = (
                s.execute(
                    text(
                        "SELECT count(*) FROM entry_grants g JOIN ledger_entries e"
                        " ON e.id = g.entry_id WHERE g.created_at <> e.created_at"
                        " UNION ALL SELECT count(*) FROM refund_totals t JOIN ledger_entries e"
                        " ON e.id = t.entry_id WHERE t.entry_created_at <> e.created_at"
                    )
                )
                .scalars()
                .all()
            )
            assert stray == [0, 0]
            assert chain.verify(s, None, 1).broken == []
            assert reconcile(s).mismatches == []
            assert_ledger_consistent(s)
            movements.debit(s, "a", 1, "image_generation")
            s.commit()
            assert chain.verify(s, None, 1).broken == []
            assert_ledger_consistent(s)
        with engine.connect() as conn:
            moved = [conn.execute(q).all() for q in (LEDGER_ROWS, SPLIT_ROWS, CAP_ROWS)]
        downgrade(alembic_config(blank_database), "0035")
        with engine.connect() as conn:
            assert [conn.execute(q).all() for q in (LEDGER_ROWS, SPLIT_ROWS, CAP_ROWS)] == moved
            kind = conn.execute(
                text("SELECT relkind FROM pg_class WHERE relname = 'ledger_entries'")
            ).scalar_one()
            assert kind == "r"
        with Session(engine) as s, s.begin():
            movements.debit(s, "a", 1, "image_generation")
            assert chain.verify(s, None, 1).broken == []
        upgrade(blank_database)
    finally:
        engine.dispose()


# --- 0038: a page's splits from their key -------------------------------------------------------

SPLITS_OF_AN_ENTRY = """
EXPLAIN (COSTS OFF)
SELECT grant_id, amount, seq FROM entry_grants WHERE entry_id = 1 AND created_at = now()
"""


def test_0038_puts_a_splits_amount_and_order_in_its_key_and_back(blank_database: str) -> None:
    """The page reads an entry's splits from the key's index alone (an index-only scan, with
    the table's pages never read once vacuumed); the downgrade builds the plain key again. Each
    month's key is the parent's, the months made later included."""
    key = text(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'entry_grants'::regclass AND contype = 'p'"
    )
    keyed = text(
        "SELECT count(*) FROM pg_inherits h JOIN pg_index x ON x.indrelid = h.inhrelid"
        " WHERE h.inhparent = 'entry_grants'::regclass AND x.indisprimary"
        " AND x.indnatts = 5 AND x.indnkeyatts = 3"
    )
    parts = text("SELECT count(*) FROM pg_inherits WHERE inhparent = 'entry_grants'::regclass")
    upgrade(blank_database, "0038")
    engine = engine_for(blank_database)
    try:
        with engine.begin() as conn:
            assert conn.execute(key).scalar_one() == (
                "PRIMARY KEY (entry_id, grant_id, created_at) INCLUDE (amount, seq)"
            )
            conn.execute(text("SELECT tokens_ledger_months(now() + interval '6 months')"))
            assert conn.execute(keyed).scalar_one() == conn.execute(parts).scalar_one()
            conn.execute(text("SET LOCAL enable_seqscan = off"))
            conn.execute(text("SET LOCAL enable_bitmapscan = off"))
            plan = "\n".join(conn.execute(text(SPLITS_OF_AN_ENTRY)).scalars())
            assert "Index Only Scan using entry_grants_" in plan, plan
        downgrade(alembic_config(blank_database), "0037")
        with engine.connect() as conn:
            assert conn.execute(key).scalar_one() == "PRIMARY KEY (entry_id, grant_id, created_at)"
    finally:
        engine.dispose()


# --- 0040: events by month ---------------------------------------------------------------------

EVENT_ROWS = text(
    "SELECT id, user_id, seq, type, at, data, entry_id, pos, webhook_done_at, webhook_attempts"
    " FROM events ORDER BY id"
)


def test_0040_partitions_the_events_by_the_ledgers_months_and_back(blank_database: str) -> None:
    """Events written at 0039 (numbered, one delivered by webhook, one not numbered yet) are in
    the partitioned table after 0040, the same rows with their ids and places, in the ledger's
    months; a new event's id and seq go on from the last; the pull cursor still reads them in
    order. The downgrade gives back the same rows in one table, ids still going on."""
    upgrade(blank_database, "0039")
    engine = engine_for(blank_database)
    ids = text("SELECT max(id) FROM events")
    try:
        with Session(engine) as s:
            with s.begin():
                accounts.open_account(s, "a", initial_balance=100)
                movements.debit(s, "a", 30, "image_generation")
            outbox.number(s)
            with s.begin():
                s.execute(text("UPDATE events SET webhook_done_at = now() WHERE seq = 1"))
                movements.debit(s, "a", 5, "image_generation")  # not numbered
        with engine.connect() as conn:
            before = conn.execute(EVENT_ROWS).all()
            last = conn.execute(ids).scalar_one()
        assert len(before) == 3 and before[-1].pos is None
        upgrade(blank_database)
        with Session(engine) as s:
            months = s.execute(text("SELECT name, lower, upper FROM tokens_partitions('events')"))
            ledger = s.execute(text("SELECT name, lower, upper FROM tokens_ledger_partitions()"))
            assert [(p.name.replace("events_", ""), p.lower, p.upper) for p in months] == [
                (p.name.replace("ledger_entries_", ""), p.lower, p.upper) for p in ledger
            ]
            assert s.execute(EVENT_ROWS).all() == before
            s.commit()
            with s.begin():
                movements.debit(s, "a", 1, "image_generation")
            new = s.execute(text("SELECT id, seq FROM events ORDER BY id DESC LIMIT 1")).one()
            assert (new.id, new.seq) == (last + 1, 4)
            outbox.number(s)
            page = outbox.list_events(s, None, 10, None)
            assert [e.seq for e in page.events] == [1, 2, 3, 4]
        with engine.connect() as conn:
            moved = conn.execute(EVENT_ROWS).all()
        downgrade(alembic_config(blank_database), "0039")
        with engine.connect() as conn:
            assert conn.execute(EVENT_ROWS).all() == moved
            kind = conn.execute(
                text("SELECT relkind FROM pg_class WHERE relname = 'events'")
            ).scalar_one()
            assert kind == "r"
        with Session(engine) as s, s.begin():
            movements.debit(s, "a", 1, "image_generation")
            assert s.execute(ids).scalar_one() == last + 2
        upgrade(blank_database)
    finally:
        engine.dispose()


def test_0041_hashes_an_entry_from_its_fields_as_from_its_row_and_back(
    blank_database: str,
) -> None:
    """The chain written at 0040 verifies at 0041 and goes on; written at 0041 it verifies
    after the downgrade and goes on: the same hash from the fields as from the row."""
    upgrade(blank_database, "0040")
    engine = engine_for(blank_database)
    try:
        with Session(engine) as s, s.begin():
            accounts.open_account(s, "a", initial_balance=100)
            movements.debit(s, "a", 30, "image_generation", metadata={"job": "x", "n": 2})
        upgrade(blank_database)
        with Session(engine) as s, s.begin():
            assert chain.verify(s, None, 1).broken == []
            movements.debit(s, "a", 5, "image_generation", metadata={"é": [1.5, None]})
            assert chain.verify(s, None, 1).broken == []
        downgrade(alembic_config(blank_database), "0040")
        with Session(engine) as s, s.begin():
            assert chain.verify(s, None, 1).broken == []
            movements.debit(s, "a", 1, "image_generation")
            assert chain.verify(s, None, 1).broken == []
        upgrade(blank_database)
    finally:
        engine.dispose()
