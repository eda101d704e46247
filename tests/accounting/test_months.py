"""accounting/months.py: the ledger's months, made ahead and dropped whole by a prune (migration
0036). Each test has a database of its own: the layout of partitions is what it changes."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from accounting import accounts, chain, ledger, months, movements, outbox
from accounting.errors import DomainError
from tests.accounting.test_against_oracle import RECHAIN
from tests.devenv import PG_ADMIN_URL
from tests.layout import month_start, months_since
from tests.support import assert_ledger_consistent
from worker.db import get_engine
from worker.migrate import upgrade

DAY = timedelta(days=1)


@pytest.fixture
def engine() -> Iterator[Engine]:
    """A new database at head, whose first partition (everything before next month, empty) is
    replaced by three past months and the current one: a ledger that has run a while."""
    name = f"tokens_months_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = get_engine().url.set(database=name).render_as_string(hide_password=False)
    engine = create_engine(url)
    try:
        upgrade(url)
        with engine.begin() as conn:
            assert months_since(conn, month_start(conn, -3)) == 4
        yield engine
    finally:
        engine.dispose()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def reading(engine: Engine, table: str) -> Iterator[None]:
    """A transaction that has read ``table`` stays open (its lock held) for the block."""
    started = threading.Event()
    done = threading.Event()

    def reader() -> None:
        with engine.connect() as conn, conn.begin():
            conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()
            started.set()
            done.wait(30)

    held = threading.Thread(target=reader)
    held.start()
    try:
        assert started.wait(10)
        yield
    finally:
        done.set()
        held.join()


def names(session: Session) -> list[str]:
    return [m.name for m in months.months(session)]


def history(engine: Engine) -> dict[str, Any]:
    """Three users whose entries span the past months: u1 everywhere (a refund of its debit two
    months back), u2 only three and two months back, u3 only now. Entries are written now and
    moved back (their splits and refund caps follow, ON UPDATE CASCADE), and the chains made
    again as the trigger would have made them at those times."""
    factory = sessionmaker(engine)
    with factory.begin() as s:
        m = {k: month_start(s.connection(), k) for k in (-3, -2, -1, 0)}
        accounts.open_account(s, "u1", initial_balance=1000)
        accounts.open_account(s, "u2", initial_balance=50)
        accounts.open_account(s, "u3", initial_balance=30)
        old = int(movements.debit(s, "u1", 100, "image_generation").ledger_entry_id)
        movements.debit(s, "u1", 20, "image_generation")
        movements.debit(s, "u2", 7, "image_generation")
        movements.refund(s, "u1", 30, original_entry_id=old)
        movements.debit(s, "u1", 5, "image_generation")
        ids = s.execute(text("SELECT id, user_id FROM ledger_entries ORDER BY id")).all()
        when = {
            ids[0].id: m[-3] + DAY,  # u1 opened
            ids[1].id: m[-3] + 2 * DAY,  # u2 opened
            ids[3].id: m[-2] + DAY,  # u1 debit 100 (refunded 30, later)
            ids[4].id: m[-1] + DAY,  # u1 debit 20
            ids[5].id: m[-2] + 2 * DAY,  # u2 debit 7
            ids[6].id: m[-1] + 20 * DAY,  # u1 refund 30
        }
        for entry, at in when.items():
            s.execute(
                text("UPDATE ledger_entries SET created_at = :t WHERE id = :i"),
                {"t": at, "i": entry},
            )
        s.execute(RECHAIN)
    return {"m": m, "old": old, "cutoff": m[-1] + 15 * DAY}


def old_part(s: Session, cutoff: datetime) -> dict[str, tuple[int, str, int]]:
    """Per user, what a prune at ``cutoff`` must carry: the sum, the last hash, the entries."""
    rows = s.execute(
        text(
            "SELECT user_id, sum(tokens_amount) AS amount, count(*) AS n,"
            " (array_agg(hash ORDER BY created_at DESC, id DESC))[1] AS hash"
            " FROM ledger_entries WHERE created_at < :c GROUP BY user_id"
        ),
        {"c": cutoff},
    ).all()
    return {r.user_id: (int(r.amount), r.hash, int(r.n)) for r in rows}


def kept(s: Session, cutoff: datetime) -> list[Any]:
    return list(
        s.execute(
            text(
                "SELECT id, user_id, tokens_amount, balance_after, hash FROM ledger_entries"
                " WHERE created_at >= :c AND kind <> 'carried_forward' ORDER BY id"
            ),
            {"c": cutoff},
        ).all()
    )


def test_make_months_makes_the_missing_months_ahead_once(engine: Engine) -> None:
    factory = sessionmaker(engine)
    with factory.begin() as s:
        before = names(s)
        made = months.make_months(s, months_ahead=5)
        assert len(made) == 2  # the migration made three months ahead
        assert names(s) == before[:-1] + [f"ledger_entries_{m}" for m in made] + [before[-1]]
        assert months.make_months(s, months_ahead=5) == []
        assert names(s)[-1] == "ledger_entries_after"
        assert names(s)[0] == "ledger_entries_before"
        listed = months.months(s)
        assert all(a.upper == b.lower for a, b in itertools.pairwise(listed))
        assert (listed[0].lower, listed[-1].upper) == (None, None)


def test_a_users_newest_entries_are_read_months_newest_first(session: Session) -> None:
    """The ranges cover every instant (MINVALUE to MAXVALUE, no default partition), so the
    planner reads the months in order and stops at the first entry: what the chain's trigger and
    a history page do on every call. A default partition would make it probe every month."""
    plan = "\n".join(
        session.execute(
            text(
                "EXPLAIN SELECT hash FROM ledger_entries WHERE user_id = 'u'"
                " ORDER BY created_at DESC, id DESC LIMIT 1"
            )
        ).scalars()
    )
    assert "Merge Append" not in plan and "Append" in plan, plan


def test_an_entry_past_every_month_is_written_and_moved_into_its_month_when_made(
    engine: Engine,
) -> None:
    """A clock far ahead stamps entries past the months made: they are written (never refused
    for housekeeping) into ``after``, and when their months are made they move into them, with
    their splits and refund caps, the same rows (hashes, ids) and no second event."""
    factory = sessionmaker(engine)
    with factory.begin() as s:
        accounts.open_account(s, "u", initial_balance=10)
        far = month_start(s.connection(), 5) + DAY
        s.execute(text("UPDATE accounts SET updated_at = :t"), {"t": far})
        spent = int(movements.debit(s, "u", 3, "image_generation").ledger_entry_id)
        movements.refund(s, "u", 1, original_entry_id=spent)
        assert partitions_holding(s, spent) == ["ledger_entries_after"]
        out = months.keep_ahead(s, months_ahead=2)
        assert (out.made, out.outside) == ([], 2)  # the months exist: they wait there
        rows = s.execute(LEDGER).all(), s.execute(SPLITS).all(), s.execute(CAPS).all()
        events = s.execute(text("SELECT count(*) FROM events")).scalar_one()
        out = months.keep_ahead(s, months_ahead=7)
        conn = s.connection()
        assert out.made == [f"{month_start(conn, k):%Y_%m}" for k in (4, 5, 6, 7)]
        assert (out.until, out.outside) == (month_start(conn, 8), 0)
        assert partitions_holding(s, spent) == [f"ledger_entries_{month_start(conn, 5):%Y_%m}"]
        assert (s.execute(LEDGER).all(), s.execute(SPLITS).all(), s.execute(CAPS).all()) == rows
        assert s.execute(text("SELECT count(*) FROM events")).scalar_one() == events
        assert_ledger_consistent(s)
        assert chain.verify(s, None, 1).broken == []
        movements.debit(s, "u", 1, "image_generation")  # the triggers are back on
        assert s.execute(text("SELECT count(*) FROM events")).scalar_one() > events
        assert chain.verify(s, None, 1).broken == []


def partitions_holding(s: Session, first_id: int) -> list[str]:
    """The partitions the entries from ``first_id`` on are in."""
    found = s.execute(
        text("SELECT DISTINCT tableoid::regclass::text FROM ledger_entries WHERE id >= :i"),
        {"i": first_id},
    )
    return list(found.scalars())


LEDGER = text(
    "SELECT id, created_at, tokens_amount, prev_hash, hash FROM ledger_entries ORDER BY id"
)
SPLITS = text("SELECT entry_id, grant_id, amount, seq, created_at FROM entry_grants ORDER BY 1, 2")
CAPS = text("SELECT entry_id, entry_created_at, charged, refunded FROM refund_totals ORDER BY 1")


def test_a_prune_drops_the_months_wholly_before_its_cutoff_and_carries_what_they_held(
    engine: Engine,
) -> None:
    setup = history(engine)
    m, cutoff = setup["m"], setup["cutoff"]
    factory = sessionmaker(engine)
    with factory() as s:
        expected = old_part(s, cutoff)
        after = kept(s, cutoff)
        cap = s.execute(text("SELECT count(*) FROM refund_totals")).scalar_one()
        assert cap == 1
    out = ledger.delete_old_entries_in_chunks(factory, cutoff)
    assert out.deleted == sum(n for _, _, n in expected.values())
    with factory() as s:
        # The partition before the first month and the two months before the cutoff's are gone
        # (an empty `before` up to the first month kept in their place); the cutoff's month
        # stays, its entries before the cutoff pruned one by one.
        first = months.months(s)[:2]
        assert [p.name for p in first] == ["ledger_entries_before", f"ledger_entries_{m[-1]:%Y_%m}"]
        assert first[0].upper == m[-1] and first[0].entries <= 0
        carried = s.execute(
            text(
                "SELECT user_id, tokens_amount, hash, created_at, (metadata->>'entries')::int AS n"
                " FROM ledger_entries WHERE kind = 'carried_forward' ORDER BY user_id"
            )
        ).all()
        assert {c.user_id: (c.tokens_amount, c.hash, c.n) for c in carried} == expected
        at = {c.user_id: c.created_at for c in carried}
        assert at["u2"] == m[-1]  # all it had was in the months dropped: dated where they end
        assert m[-1] < at["u1"] < cutoff  # folded again with its entry of last month
        assert kept(s, cutoff) == after
        assert s.execute(text("SELECT count(*) FROM refund_totals")).scalar_one() == 0
        assert_ledger_consistent(s)
        assert chain.verify(s, None, 1).broken == []
        assert ledger.reconcile(s, None).mismatches == []
        with pytest.raises(DomainError) as refused:
            movements.refund(s, "u1", 1, original_entry_id=setup["old"])
        assert refused.value.code == "ENTRY_NOT_FOUND"
        s.rollback()
    # Again: nothing left to drop or prune.
    assert ledger.delete_old_entries_in_chunks(factory, cutoff).deleted == 0


def test_a_drop_that_cannot_lock_the_ledger_changes_nothing_and_the_prune_still_happens(
    engine: Engine,
) -> None:
    """A transaction reading the ledger holds the drop off: after lock_timeout it gives up,
    carrying nothing (its checkpoints roll back with it), and the prune goes entry by entry."""
    setup = history(engine)
    cutoff = setup["cutoff"]
    factory = sessionmaker(engine)
    with factory() as s:
        expected = old_part(s, cutoff)
        layout = names(s)
    with reading(engine, "ledger_entries"):
        with factory.begin() as s:
            assert months.drop_old_months(s, cutoff) == ([], 0)
        with factory() as s:
            assert names(s) == layout
            assert (
                s.execute(
                    text("SELECT count(*) FROM ledger_entries WHERE kind = 'carried_forward'")
                ).scalar_one()
                == 0
            )
            assert old_part(s, cutoff) == expected
    with factory.begin() as s:
        out = ledger.delete_old_entries(s, cutoff)  # entry by entry, in one transaction
    assert out.deleted == sum(n for _, _, n in expected.values())
    with factory() as s:
        assert names(s) == layout
        assert_ledger_consistent(s)
        assert chain.verify(s, None, 1).broken == []


def test_a_month_boundary_an_entry_sits_on_is_not_dropped_to(engine: Engine) -> None:
    """A checkpoint dated at the boundary must come before the entry there (ids would order it
    after): the drop stops at the boundary before."""
    setup = history(engine)
    m = setup["m"]
    factory = sessionmaker(engine)
    with factory.begin() as s:
        # u1's debit of two months back moved to exactly the first instant of last month.
        s.execute(
            text("UPDATE ledger_entries SET created_at = :t WHERE id = :i"),
            {"t": m[-1], "i": setup["old"]},
        )
        s.execute(RECHAIN)
    with factory.begin() as s:
        dropped, _ = months.drop_old_months(s, setup["cutoff"])
    assert dropped == ["ledger_entries_before", f"ledger_entries_{m[-3]:%Y_%m}"]
    with factory() as s:
        assert_ledger_consistent(s)
        assert chain.verify(s, None, 1).broken == []


def test_a_splits_key_check_probes_one_entry_whatever_shares_its_instant(session: Session) -> None:
    """The key check PostgreSQL runs for each split (a generic plan on the ledger) finds its
    entry by both columns: entries stamped at one instant (a batch's, the checkpoints of a
    month dropped) would otherwise each scan all the others, quadratic in their number."""
    session.execute(
        text(
            "PREPARE key_check(bigint, timestamptz) AS SELECT 1 FROM ledger_entries x"
            " WHERE id = $1 AND created_at = $2 FOR KEY SHARE OF x"
        )
    )
    session.execute(text("SET LOCAL plan_cache_mode = force_generic_plan"))
    plan = "\n".join(session.execute(text("EXPLAIN EXECUTE key_check(1, now())")).scalars())
    session.execute(text("DEALLOCATE key_check"))
    conditions = [line for line in plan.splitlines() if "Index Cond" in line]
    assert conditions and all("id = $1" in c and "created_at = $2" in c for c in conditions), plan


# --- events by month (migration 0040) ----------------------------------------------------------


def event_names(s: Session) -> list[str]:
    return list(s.execute(text("SELECT name FROM tokens_partitions('events')")).scalars())


def events_in_months(engine: Engine) -> dict[int, datetime]:
    """u's events (seq 1 to 6): two three months back, two two months back, one last month,
    one now; all numbered and sent on the Celery channel, all posted by webhook but seq 4 (two
    months back) and seq 6 (now)."""
    factory = sessionmaker(engine)
    with factory() as s:
        accounts.open_account(s, "u", initial_balance=100)
        for _ in range(5):
            movements.debit(s, "u", 1, "image_generation")
        s.commit()
        m = {k: month_start(s.connection(), k) for k in (-3, -2, -1, 0)}
        when = {1: m[-3] + DAY, 2: m[-3] + 2 * DAY, 3: m[-2] + DAY, 4: m[-2] + 2 * DAY}
        for seq, at in {**when, 5: m[-1] + DAY}.items():
            s.execute(text("UPDATE events SET at = :t WHERE seq = :q"), {"t": at, "q": seq})
        s.commit()
        while outbox.number(s):
            pass
        outbox.channel_done(
            s, outbox.CELERY, s.execute(text("SELECT max(pos) FROM events")).scalar_one()
        )
        posted = s.execute(text("SELECT id FROM events WHERE seq NOT IN (4, 6)")).scalars().all()
        outbox.webhook_delivered(s, list(posted))
    return m


def worker_engine(engine: Engine) -> Engine:
    """An engine on the same database, logged in as the worker's role."""
    with engine.begin() as conn:
        conn.execute(text("ALTER ROLE tokens_worker LOGIN"))
    url = engine.url.set(username="tokens_worker").render_as_string(hide_password=False)
    return create_engine(url)


def seqs(s: Session) -> list[int]:
    return list(s.execute(text("SELECT seq FROM events ORDER BY seq")).scalars())


def test_make_months_makes_the_events_months_with_the_ledgers(engine: Engine) -> None:
    with sessionmaker(engine).begin() as s:
        months.make_months(s, months_ahead=5)
        assert [n.replace("events_", "") for n in event_names(s)][-7:] == [
            n.replace("ledger_entries_", "") for n in names(s)
        ][-7:]


def test_events_prune_drops_the_months_whose_every_event_may_go_and_deletes_the_rest(
    engine: Engine,
) -> None:
    """As the worker's role (the drop is the owner's, through SECURITY DEFINER): the months
    wholly before the cutoff go whole, oldest first, up to one holding an event the webhook has
    yet to post; the rest past the cutoff go row by row. The ledger's months are not touched."""
    m = events_in_months(engine)
    factory = sessionmaker(engine)
    with factory() as s:
        ledger_months = names(s)
    worker = worker_engine(engine)
    try:
        with Session(worker) as s:
            # The cutoff is now: `before` (empty) and three months back go whole (seq 1, 2);
            # two months back holds seq 4, not posted: it stays, its seq 3 deleted, and last
            # month's seq 5; seq 6 is not posted either.
            assert outbox.prune(s, 0, celery=True, webhook=True) == 4
            assert seqs(s) == [4, 6]
            assert event_names(s)[:3] == [
                "events_before",
                f"events_{m[-2]:%Y_%m}",
                f"events_{m[-1]:%Y_%m}",
            ]
            bounds = s.execute(text("SELECT upper FROM tokens_partitions('events') LIMIT 1"))
            assert bounds.scalar_one() == m[-2]
            assert names(s) == ledger_months
            outbox.webhook_delivered(
                s, [s.execute(text("SELECT id FROM events WHERE seq = 4")).scalar_one()]
            )
            assert outbox.prune(s, 0, celery=True, webhook=True) == 1
            assert seqs(s) == [6]
            assert event_names(s)[:2] == ["events_before", f"events_{m[0]:%Y_%m}"]
            assert names(s) == ledger_months
            movements.debit(s, "u", 1, "image_generation")
            s.commit()
            assert seqs(s) == [6, 7]
    finally:
        worker.dispose()


def test_an_events_drop_that_cannot_lock_them_drops_nothing_and_the_prune_still_happens(
    engine: Engine,
) -> None:
    """A transaction reading the events holds the drop off: after lock_timeout it gives up and
    the prune deletes row by row what the drop would have taken."""
    events_in_months(engine)
    factory = sessionmaker(engine)
    with factory() as s:
        layout = event_names(s)
    with reading(engine, "events"), factory() as s:
        assert outbox.prune(s, 0, celery=True, webhook=True) == 4
        assert event_names(s) == layout
        assert seqs(s) == [4, 6]


def test_an_event_past_every_month_moves_into_its_month_when_made(engine: Engine) -> None:
    """An entry stamped by a clock far ahead writes its event into `after`; when the months are
    made, the event moves into its month with its id, seq and place."""
    with sessionmaker(engine).begin() as s:
        accounts.open_account(s, "u", initial_balance=10)
        far = month_start(s.connection(), 5) + DAY
        s.execute(text("UPDATE accounts SET updated_at = :t"), {"t": far})
        movements.debit(s, "u", 3, "image_generation")
        where = text("SELECT tableoid::regclass::text FROM events WHERE seq = 2")
        assert s.execute(where).scalar_one() == "events_after"
        rows = s.execute(text("SELECT id, seq, at, pos, data FROM events ORDER BY id")).all()
        months.keep_ahead(s, months_ahead=7)
        assert s.execute(where).scalar_one() == f"events_{month_start(s.connection(), 5):%Y_%m}"
        assert (
            s.execute(text("SELECT id, seq, at, pos, data FROM events ORDER BY id")).all() == rows
        )
