"""accounting/expiry.py (``grants.expire``) over real PostgreSQL, races included."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from accounting import accounts, expiry, movements, reservations
from accounting.errors import DomainError
from accounting.events import grants_expired
from models.tables import utcnow
from tests.support import assert_ledger_consistent, run_in_threads
from worker.db import get_engine

ROUNDS = 10


@pytest.fixture
def sessions() -> Iterator[sessionmaker[Session]]:
    """Sessions on an engine of their own, a connection per racing thread."""
    engine = create_engine(get_engine().url, pool_size=20, max_overflow=0, pool_timeout=60)
    try:
        yield sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    finally:
        engine.dispose()


@pytest.fixture
def sent() -> Iterator[list[dict[str, Any]]]:
    """Every ``grants_expired`` sent."""
    events: list[dict[str, Any]] = []

    def receiver(sender: Any, **kw: Any) -> None:
        events.append({"grants": kw["grants"], "tokens": kw["tokens"]})

    grants_expired.connect(receiver, weak=False)
    try:
        yield events
    finally:
        grants_expired.disconnect(receiver)


def credit(session: Session, user_id: str, amount: int, kind: str = "purchased") -> None:
    """A grant of ``amount`` that ends in an hour (made due by :func:`make_due`)."""
    soon = utcnow() + timedelta(hours=1)
    movements.credit(session, user_id, amount, grant_kind=kind, expires_at=soon)


def make_due(session: Session, seconds: int = 1) -> None:
    """Every grant ending within two hours ended ``seconds`` ago (the earliest made first)."""
    session.execute(
        text(
            "UPDATE grants SET expires_at = clock_timestamp()"
            " - make_interval(secs => :s) - make_interval(secs => 1000 - id % 1000)"
            " WHERE expires_at < clock_timestamp() + interval '2 hours'"
        ),
        {"s": seconds},
    )
    session.commit()


def expiry_entries(session: Session) -> list[tuple[str, int, int, int, str]]:
    """(user, amount, before, after, grant_id) of every expiry entry, per user in order."""
    rows = session.execute(
        text(
            "SELECT e.user_id, e.tokens_amount, e.balance_before, e.balance_after,"
            "       e.metadata ->> 'grant_id', e.operation_type, eg.grant_id, eg.amount, eg.seq"
            " FROM ledger_entries e JOIN entry_grants eg ON eg.entry_id = e.id"
            " WHERE e.kind = 'expiry' ORDER BY e.user_id, e.created_at, e.id"
        )
    ).all()
    for r in rows:
        # One split per entry: the grant its metadata names, the entry's amount, seq 0.
        assert (r[5], str(r[6]), r[7], r[8]) == ("expiry", r[4], r[1], 0)
    return [(r[0], r[1], r[2], r[3], r[4]) for r in rows]


def grant_rows(session: Session, user_id: str) -> list[tuple[str, int, int, int, str, bool]]:
    """(kind, amount, remaining, expired, status, ended_at = expires_at) in id order."""
    return [
        (r[0], r[1], r[2], r[3], r[4], bool(r[5]))
        for r in session.execute(
            text(
                "SELECT kind, amount, remaining, expired, status, ended_at = expires_at"
                " FROM grants WHERE user_id = :u ORDER BY id"
            ),
            {"u": user_id},
        )
    ]


def balance(session: Session, user_id: str) -> tuple[int, int]:
    row = session.execute(
        text("SELECT tokens_balance, tokens_reserved FROM accounts WHERE user_id = :u"),
        {"u": user_id},
    ).one()
    return int(row[0]), int(row[1])


def test_expires_exactly_the_due_unheld_tokens_one_chained_entry_per_grant(
    session: Session, sessions: sessionmaker[Session], sent: list[dict[str, Any]]
) -> None:
    accounts.open_account(session, "u1", initial_balance=100)
    credit(session, "u1", 30)
    credit(session, "u1", 20, "promo")
    accounts.open_account(session, "u2", initial_balance=0)
    credit(session, "u2", 50)
    session.commit()
    # u2 holds 15 of its grant; u1 spends 5 of its promo (priority 20, first in burn order).
    reserved = reservations.reserve(session, "u2", amount=15, ttl_seconds=3600)
    movements.debit(session, "u1", 5, "image_generation")
    session.commit()
    movements.credit(session, "u1", 7, expires_at=utcnow() + timedelta(hours=3))  # not due
    session.commit()
    make_due(session)

    assert expiry.expire_all(sessions) == (3, 30 + 15 + 35)
    session.expire_all()
    # u1: the adjustment untouched, both due grants expired (what was left of each), the new
    # grant active; u2: only what the reservation holds stays, in a still active grant.
    assert grant_rows(session, "u1") == [
        ("adjustment", 100, 100, 0, "active", False),
        ("purchased", 30, 0, 30, "expired", True),
        ("promo", 20, 0, 15, "expired", True),
        ("purchased", 7, 7, 0, "active", False),
    ]
    assert grant_rows(session, "u2") == [("purchased", 50, 15, 35, "active", True)]
    g1, g2 = session.execute(
        text("SELECT id::text FROM grants WHERE user_id = 'u1' AND status = 'expired' ORDER BY id")
    ).scalars()
    (g3,) = session.execute(text("SELECT id::text FROM grants WHERE user_id = 'u2'")).scalars()
    # Chained per user in expiry order (the purchase ended first: make_due orders by id).
    assert expiry_entries(session) == [
        ("u1", -30, 152, 122, g1),
        ("u1", -15, 122, 107, g2),
        ("u2", -35, 50, 15, g3),
    ]
    assert balance(session, "u1") == (107, 0)
    assert balance(session, "u2") == (15, 15)
    # One signal per expiry entry, as a movement sends for the grants it expires.
    assert sent == [
        {"grants": 1, "tokens": 30},
        {"grants": 1, "tokens": 15},
        {"grants": 1, "tokens": 35},
    ]
    # Nothing twice: a second run finds nothing.
    assert expiry.expire_all(sessions) == (0, 0)
    assert len(expiry_entries(session)) == 3
    # A capture spends the held tokens of the expired grant; nothing is left to expire.
    reservations.capture(session, reserved.reservation_id, amount=15)
    session.commit()
    assert grant_rows(session, "u2") == [("purchased", 50, 0, 35, "depleted", False)]
    assert_ledger_consistent(session)


def test_held_tokens_expire_once_the_reservation_ends(
    session: Session, sessions: sessionmaker[Session]
) -> None:
    accounts.open_account(session, "u1", initial_balance=0)
    credit(session, "u1", 40)
    session.commit()
    reservations.reserve(session, "u1", amount=40, ttl_seconds=60)
    session.commit()
    make_due(session)
    # Fully held: nothing to expire while the reservation lives.
    assert expiry.expire_all(sessions) == (0, 0)
    assert grant_rows(session, "u1") == [("purchased", 40, 40, 0, "active", False)]
    # The reservation sweep frees the hold and leaves the grant's expiry to grants.expire.
    assert reservations.expire_all(sessions, now=utcnow() + timedelta(minutes=5)) == 1
    session.expire_all()
    assert grant_rows(session, "u1") == [("purchased", 40, 40, 0, "active", False)]
    assert expiry.expire_all(sessions) == (1, 40)
    session.expire_all()
    assert grant_rows(session, "u1") == [("purchased", 40, 0, 40, "expired", True)]
    assert balance(session, "u1") == (0, 0)
    assert_ledger_consistent(session)


def test_the_database_clock_decides_what_is_due(
    session: Session, sessions: sessionmaker[Session]
) -> None:
    accounts.open_account(session, "u1", initial_balance=0)
    credit(session, "u1", 10)
    session.commit()
    assert expiry.expire_all(sessions) == (0, 0)
    make_due(session)
    assert expiry.expire_all(sessions) == (1, 10)
    assert_ledger_consistent(session)


def test_chunks_are_bounded(session: Session, sessions: sessionmaker[Session]) -> None:
    for i in range(7):
        accounts.open_account(session, f"u{i}", initial_balance=1)
        credit(session, f"u{i}", 10 + i)
    session.commit()
    make_due(session)
    taken = []
    while True:
        with sessions() as s, s.begin():
            chunk = expiry.expire_chunk(s, limit=3)
        taken.append((chunk.users, chunk.grants))
        if chunk.users == 0:
            break
    assert taken == [(3, 3), (3, 3), (1, 1), (0, 0)]
    # The chunks go oldest end first, each user's account once.
    users = [r[0] for r in expiry_entries(session)]
    assert sorted(users) == [f"u{i}" for i in range(7)]
    assert_ledger_consistent(session)


def test_a_chunk_takes_all_of_a_picked_users_due_grants(
    session: Session, sessions: sessionmaker[Session]
) -> None:
    accounts.open_account(session, "u1", initial_balance=0)
    for amount in (1, 2, 3, 4):
        credit(session, "u1", amount)
    session.commit()
    make_due(session)
    with sessions() as s, s.begin():
        chunk = expiry.expire_chunk(s, limit=1)
    assert chunk == expiry.Chunk(users=1, grants=4, tokens=10)
    assert [e[1:4] for e in expiry_entries(session)] == [
        (-1, 10, 9),
        (-2, 9, 7),
        (-3, 7, 4),
        (-4, 4, 0),
    ]
    assert_ledger_consistent(session)


def test_a_locked_account_is_skipped_not_waited_for(
    session: Session, sessions: sessionmaker[Session]
) -> None:
    for user in ("u1", "u2"):
        accounts.open_account(session, user, initial_balance=0)
        credit(session, user, 10)
    session.commit()
    make_due(session)
    with sessions() as holder:
        holder.execute(text("SELECT 1 FROM accounts WHERE user_id = 'u1' FOR UPDATE"))
        assert expiry.expire_all(sessions) == (1, 10)
        holder.rollback()
    assert [e[0] for e in expiry_entries(session)] == ["u2"]
    assert expiry.expire_all(sessions) == (1, 10)
    assert_ledger_consistent(session)


USERS = 16
GRANTS_PER_USER = 3


def _race_round(sessions: sessionmaker[Session]) -> tuple[int, int]:
    """Two sweeps, and on every user a debit, a refund of it and a reserve + capture, all at
    once; returns the sweeps' (grants, tokens)."""

    def work(i: int) -> tuple[int, int]:
        if i < 2:
            return expiry.expire_all(sessions, chunk_size=3)
        user = f"u{(i - 2) % USERS}"
        with sessions() as s:
            try:
                if i % 2:
                    out = movements.debit(s, user, 3, "image_generation")
                    s.commit()
                    movements.refund(s, user, 2, original_entry_id=out.ledger_entry_id)
                else:
                    held = reservations.reserve(s, user, amount=4)
                    s.commit()
                    reservations.capture(s, held.reservation_id, amount=3)
                s.commit()
            except DomainError:
                s.rollback()
        return 0, 0

    results = run_in_threads(2 + USERS, work)
    return sum(r[0] for r in results), sum(r[1] for r in results)


def test_concurrent_sweeps_and_movements_never_expire_anything_twice(
    session: Session, sessions: sessionmaker[Session]
) -> None:
    swept = 0
    for _ in range(ROUNDS):
        session.execute(text("TRUNCATE accounts, idempotency_records, refund_totals CASCADE"))
        session.commit()
        for u in range(USERS):
            accounts.open_account(session, f"u{u}", initial_balance=100)
            for g in range(GRANTS_PER_USER):
                credit(session, f"u{u}", 10 + g)
        session.commit()
        make_due(session)
        by_sweeps = _race_round(sessions)
        swept += by_sweeps[0]
        session.expire_all()
        # Every due grant expired exactly once, by a sweep or by its user's movement.
        per_grant = session.execute(
            text(
                "SELECT g.id, g.amount, g.expired, g.status, count(e.id)"
                " FROM grants g LEFT JOIN entry_grants eg ON eg.grant_id = g.id"
                " LEFT JOIN ledger_entries e ON e.id = eg.entry_id AND e.kind = 'expiry'"
                " WHERE g.kind = 'purchased' GROUP BY g.id"
            )
        ).all()
        assert len(per_grant) == USERS * GRANTS_PER_USER
        assert all((r[2], r[3], r[4]) == (r[1], "expired", 1) for r in per_grant), per_grant
        total = sum(r[1] for r in per_grant)
        assert by_sweeps[0] <= len(per_grant) and by_sweeps[1] <= total
        assert_ledger_consistent(session)
    # Both sides won some races (a sweep takes one or two users a round, movements the rest).
    assert 0 < swept < ROUNDS * USERS * GRANTS_PER_USER


def test_the_chunk_finds_due_grants_through_the_partial_index(session: Session) -> None:
    """The chunk asks ``tokens_grant_due`` (the one definition of a due grant), which the planner
    inlines: the partial index on active grants' ends still serves, no function is called per
    grant. Were it not inlined, the index's condition could not be proved and the sweep would
    read every grant."""
    session.execute(text("SET LOCAL enable_seqscan = off"))
    sql = str(expiry._CHUNK.compile(session.get_bind(), compile_kwargs={"literal_binds": True}))
    plan = "\n".join(session.execute(text("EXPLAIN " + sql.replace(":limit", "10"))).scalars())
    assert "ix_grants_active_expiry" in plan, plan
    assert "tokens_grant_due" not in plan, plan
