"""Test helpers: real worker processes, and a producer that knows only the contract."""

from __future__ import annotations

import importlib.util
import socket
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from types import ModuleType
from typing import Any, TypeVar

from celery import Celery
from sqlalchemy import event, text
from sqlalchemy.orm import Session

import worker.db
from accounting.errors import DomainError
from tests.devenv import ROOT, WorkerProcess, producer, running_workers
from tests.polling import wait_for
from worker.db import get_engine, session_scope

__all__ = ["ROOT", "TABLES", "WorkerProcess", "call", "free_port", "producer", "running_workers"]

TABLES = (
    "entry_grants",
    "reservation_grants",
    "grants",
    "idempotency_records",
    "refund_totals",
    "reservations",
    "ledger_entries",
    "accounts",
    "spend_limits",
    "limit_buckets",
    "sweep_chunks",
    "sweeps",
    "events",
    "event_channels",
    "event_alerts",
)
T = TypeVar("T")
R = TypeVar("R")


def tasks_done_by_worker(app: Celery, name: str) -> dict[str, int]:
    """How many ``name`` tasks each running worker has taken so far (its ``stats`` totals)."""
    stats = app.control.inspect(timeout=2).stats() or {}
    return {host.split("@")[0]: s.get("total", {}).get(name, 0) for host, s in stats.items()}


def workers_that_ran(app: Celery, name: str, before: dict[str, int]) -> set[str]:
    """The workers that took ``name`` tasks since ``before`` was read."""
    after = tasks_done_by_worker(app, name)
    return {w for w, n in after.items() if n > before.get(w, 0)}


@contextmanager
def statements_sent() -> Iterator[list[str]]:
    """Every statement this process sends meanwhile: through the Core, and alone on a driver
    connection (``worker.db.statement_scope``)."""
    sent: list[str] = []

    def core(conn: Any, cursor: Any, sql: str, *args: Any) -> None:
        sent.append(sql)

    run_alone = worker.db._run_alone

    def alone(engine: Any, pooled: Any, sql: str, params: dict[str, Any]) -> Any:
        sent.append(sql)
        return run_alone(engine, pooled, sql, params)

    event.listen(get_engine(), "before_cursor_execute", core)
    worker.db._run_alone = alone
    try:
        yield sent
    finally:
        worker.db._run_alone = run_alone
        event.remove(get_engine(), "before_cursor_execute", core)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now: for a server to listen on, or one nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def call(app: Celery, name: str, /, **kwargs: Any) -> dict[str, Any]:
    """Send ``name`` with ``kwargs`` and wait for its result."""
    result: dict[str, Any] = app.send_task(name, kwargs=kwargs).get(timeout=60)
    return result


# --- domain-level helpers --------------------------------------------------------------------


def refused(session: Session, action: Callable[..., Any], /, *args: Any, **kw: Any) -> DomainError:
    """Run ``action(session, …)``, expect a refusal, and roll back as every caller does."""
    try:
        action(session, *args, **kw)
    except DomainError as exc:
        session.rollback()
        return exc
    raise AssertionError(f"{action.__name__} was not refused")


def attempt(action: Callable[..., R], /, *args: Any, **kw: Any) -> R | DomainError:
    """``action`` in its own transaction (``session_scope``): committed, or rolled back and the
    refusal returned. What a task does, minus Celery."""
    try:
        with session_scope() as session:
            return action(session, *args, **kw)
    except DomainError as exc:
        return exc


def run_in_threads(count: int, work: Callable[[int], T]) -> list[T]:
    """Run ``work(i)`` in ``count`` threads released together; returns results in order of ``i``.

    Each ``work`` must use its own session (``worker.db.session_scope``): a session is not
    thread-safe, and the race under test is between transactions.
    """
    barrier = threading.Barrier(count)

    def start(i: int) -> T:
        barrier.wait(timeout=30)
        return work(i)

    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(start, range(count)))


def waiting_on_locks() -> int:
    """How many sessions of the test database wait for a lock now (a fresh connection each
    time: pg_stat_activity is a snapshot for a whole transaction)."""
    with get_engine().connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


@contextmanager
def blocked(work: Callable[[], T], timeout: float = 10) -> Iterator[Future[T]]:
    """Run ``work`` in a thread and return once it waits for a lock (one more session waiting
    than before); the future is its outcome. Leaving the block waits for it to finish."""
    before = waiting_on_locks()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(work)
        wait_for(lambda: future.done() or waiting_on_locks() > before, timeout, "a wait for a lock")
        assert not future.done(), f"finished without waiting: {future.result()!r}"
        yield future


def assert_ledger_consistent(session: Session, *, entry_splits: bool = True) -> None:
    """The ledger's invariants, checked with plain SQL (independent of ``ledger.reconcile``):

    every entry's ``balance_after == balance_before + tokens_amount``; each user's entries, in
    the contract's order (``created_at``, ties by ``id``), chain (each starts where the previous
    ended, the first at 0), so no update was lost and the timestamps tell the order applied; and
    every balance equals the sum of that user's ledger. ``entry_splits``: see
    :func:`assert_grants_consistent`.
    """
    bad_arithmetic = session.execute(
        text("SELECT id FROM ledger_entries WHERE balance_after <> balance_before + tokens_amount")
    ).all()
    assert bad_arithmetic == [], f"entries with wrong arithmetic: {bad_arithmetic}"
    # A pruned user's history starts with its carried_forward entry, at 0, like anyone's.
    broken_chain = session.execute(
        text(
            """
            SELECT user_id, id, balance_before, previous_after FROM (
                SELECT user_id, id, balance_before,
                       COALESCE(LAG(balance_after) OVER (
                           PARTITION BY user_id ORDER BY created_at, id
                       ), 0) AS previous_after
                FROM ledger_entries
            ) chained
            WHERE balance_before <> previous_after
            """
        )
    ).all()
    assert broken_chain == [], f"entries not chained to the previous one: {broken_chain}"
    mismatched = session.execute(
        text(
            """
            SELECT a.user_id, a.tokens_balance, COALESCE(SUM(e.tokens_amount), 0) AS ledger_sum
            FROM accounts a LEFT JOIN ledger_entries e ON e.user_id = a.user_id
            GROUP BY a.user_id, a.tokens_balance
            HAVING a.tokens_balance <> COALESCE(SUM(e.tokens_amount), 0)
            """
        )
    ).all()
    assert mismatched == [], f"balances differing from their ledger: {mismatched}"
    assert_grants_consistent(session, entry_splits=entry_splits)


def assert_grants_consistent(session: Session, *, entry_splits: bool = True) -> None:
    """The grant invariants (contract v1.1), in plain SQL independent of ``ledger.reconcile``:
    balance = active grants' remaining - debt; each grant's own arithmetic; what grants hold is
    what active reservations hold of them, and sums to ``tokens_reserved``; each entry's amount
    is its split less the change in debt (so every change to a grant is in some entry's split,
    a pruned history's in its carried_forward entry; unless ``entry_splits`` is False: the
    grants migration 0004 made have no creating entry); an ended grant keeps nothing."""

    def none(sql: str, what: str) -> None:
        rows = session.execute(text(sql)).all()
        assert rows == [], f"{what}: {rows}"

    none(
        """
        SELECT a.user_id, a.tokens_balance, a.debt, COALESCE(SUM(g.remaining), 0)
        FROM accounts a LEFT JOIN grants g ON g.user_id = a.user_id AND g.status = 'active'
        GROUP BY a.user_id, a.tokens_balance, a.debt
        HAVING a.tokens_balance <> COALESCE(SUM(g.remaining), 0) - a.debt
        """,
        "balances differing from their grants less debt",
    )
    none(
        """
        SELECT id, amount, remaining, spent, expired, returned, held, status FROM grants
        WHERE remaining <> amount - spent - expired + returned OR remaining < 0
           OR held < 0 OR held > remaining OR (status <> 'active' AND remaining <> 0)
           OR (status = 'active' AND remaining = 0)
        """,
        "grants whose arithmetic fails",
    )
    none(
        """
        SELECT g.id, g.held, COALESCE(SUM(rg.amount), 0) FROM grants g
        LEFT JOIN reservation_grants rg ON rg.grant_id = g.id
        LEFT JOIN reservations r ON r.id = rg.reservation_id AND r.status = 'active'
        GROUP BY g.id, g.held
        HAVING g.held <> COALESCE(SUM(CASE WHEN r.id IS NOT NULL THEN rg.amount END), 0)
        """,
        "grants holding other than their active reservations",
    )
    none(
        """
        SELECT r.id, r.amount, COALESCE(SUM(rg.amount), 0) FROM reservations r
        LEFT JOIN reservation_grants rg ON rg.reservation_id = r.id
        WHERE r.status = 'active'
        GROUP BY r.id, r.amount HAVING r.amount <> COALESCE(SUM(rg.amount), 0)
        """,
        "active reservations not backed by grants",
    )
    none(
        """
        SELECT a.user_id, a.tokens_reserved, COALESCE(SUM(g.held), 0) FROM accounts a
        LEFT JOIN grants g ON g.user_id = a.user_id
        GROUP BY a.user_id, a.tokens_reserved
        HAVING a.tokens_reserved <> COALESCE(SUM(g.held), 0)
        """,
        "reserved differing from what grants hold",
    )
    if not entry_splits:
        return
    none(
        """
        SELECT g.id, g.remaining, COALESCE(SUM(eg.amount), 0) FROM grants g
        LEFT JOIN entry_grants eg ON eg.grant_id = g.id
        GROUP BY g.id, g.remaining HAVING g.remaining <> COALESCE(SUM(eg.amount), 0)
        """,
        "grants whose remaining is not the sum of their entries' splits",
    )


def _verify_ledger() -> ModuleType:
    """docs/verify_ledger.py, the contract's chain check with only the standard library."""
    spec = importlib.util.spec_from_file_location(
        "verify_ledger", ROOT / "docs" / "verify_ledger.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


verify_ledger = _verify_ledger()
