"""Helpers of the grant tests: make grants of a given shape, and read where entries took tokens."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from accounting import accounts, grants, ledger, movements
from accounting.errors import DomainError
from models.tables import entry_grant_table
from tests.support import run_in_threads
from worker.db import get_engine


def opened(session: Session, user_id: str = "u1", balance: int = 0) -> None:
    accounts.open_account(session, user_id, initial_balance=balance)
    session.commit()


def credited(
    session: Session,
    amount: int,
    user_id: str = "u1",
    *,
    kind: str = "purchased",
    priority: int | None = None,
    expires_at: datetime | None = None,
) -> str:
    """Credit a grant and return its id."""
    out = movements.credit(
        session, user_id, amount, grant_kind=kind, priority=priority, expires_at=expires_at
    )
    session.commit()
    (grant_id,) = split_of(session, out.ledger_entry_id)
    return grant_id[0]


def split_of(session: Session, entry_id: str) -> list[tuple[str, int]]:
    """How the entry split across grants, (grant_id, amount) in the order applied."""
    eg = entry_grant_table.c
    rows = session.execute(
        select(eg.grant_id, eg.amount).where(eg.entry_id == int(entry_id)).order_by(eg.seq)
    ).all()
    return [(str(g), int(a)) for g, a in rows]


def entry_splits(session: Session, user_id: str = "u1") -> dict[str, list[tuple[str, int]]]:
    """Each entry's ``grants`` as ``ledger.user_entries`` returns them, by entry id."""
    entries = ledger.user_entries(session, user_id, limit=1000).entries
    return {e.id: [(s.grant_id, s.amount) for s in e.grants] for e in entries}


def grant_rows(session: Session, user_id: str = "u1") -> dict[str, Any]:
    """Every grant of the user (ended ones too) by id, as ``tokens.grants`` lists it."""
    return {g.grant_id: g for g in grants.list_grants(session, user_id, True).grants}


def raw_grant(session: Session, grant_id: str) -> Any:
    """The grant's own row, counters included (read without settling anything)."""
    return session.execute(text("SELECT * FROM grants WHERE id = :g"), {"g": int(grant_id)}).one()


def make_due(session: Session, grant_id: str) -> None:
    """The grant's end passes: it is due from now on (nothing written yet)."""
    session.execute(
        text("UPDATE grants SET expires_at = now() - interval '1 second' WHERE id = :g"),
        {"g": int(grant_id)},
    )
    session.commit()


def expiry_entries(session: Session, grant_id: str) -> list[int]:
    """The amounts of the ``expiry`` entries of one grant, in order."""
    return [
        int(a)
        for (a,) in session.execute(
            text(
                "SELECT tokens_amount FROM ledger_entries WHERE kind = 'expiry' "
                "AND metadata->>'grant_id' = :g ORDER BY id"
            ),
            {"g": grant_id},
        )
    ]


R = TypeVar("R")


@contextmanager
def racing_sessions(size: int) -> Iterator[sessionmaker[Session]]:
    """Sessions on an engine of their own with a connection per racing thread."""
    engine = create_engine(get_engine().url, pool_size=size, max_overflow=0, pool_timeout=60)
    try:
        yield sessionmaker(bind=engine, expire_on_commit=False, autoflush=False)
    finally:
        engine.dispose()


def attempt(
    factory: sessionmaker[Session], action: Callable[..., R], /, *args: Any, **kw: Any
) -> R | DomainError:
    """``action`` in its own committed transaction, or the refusal (rolled back)."""
    with factory() as s:
        try:
            out = action(s, *args, **kw)
            s.commit()
            return out
        except DomainError as exc:
            s.rollback()
            return exc


def race(*racers: Callable[[], Any]) -> list[Any]:
    """Run the racers in threads released together; their outcomes in order."""
    return run_in_threads(len(racers), lambda i: racers[i]())
