"""worker/signals.py: ``balance_changed`` is sent after the commit, never for a rollback."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting import accounts, movements
from tests.support import WorkerProcess, refused, running_workers
from worker.db import get_engine, session_scope
from worker.signals import balance_changed

Change = tuple[str, str, int, int]  # operation, user_id, balance, tokens_reserved


@pytest.fixture
def sent(session: Session) -> Iterator[list[Change]]:
    """Every ``balance_changed`` sent during the test. One sent before its change was committed
    (no entry ending at that balance visible to another connection) is recorded under the
    operation ``UNCOMMITTED`` (an assert would only be logged: the signal catches it)."""
    received: list[Change] = []

    def receiver(sender: Any, **kw: Any) -> None:
        with get_engine().connect() as other:
            committed = other.execute(
                text("SELECT 1 FROM ledger_entries WHERE user_id = :u AND balance_after = :b"),
                {"u": kw["user_id"], "b": kw["balance"]},
            ).first()
        operation = kw["operation"] if committed else "UNCOMMITTED"
        received.append((operation, kw["user_id"], kw["balance"], kw["tokens_reserved"]))

    balance_changed.connect(receiver, weak=False)
    try:
        yield received
    finally:
        balance_changed.disconnect(receiver)


def test_sent_after_commit_in_order(session: Session, sent: list[Change]) -> None:
    accounts.open_account(session, "u1", initial_balance=100)
    assert sent == []
    session.commit()
    assert sent == [("open_account", "u1", 100, 0)]
    movements.debit(session, "u1", 10, "image_generation")
    movements.credit(session, "u1", 5)
    session.execute(text("SELECT 1"))  # more work in the same transaction
    assert sent == [("open_account", "u1", 100, 0)]
    session.commit()
    assert sent[1:] == [("debit", "u1", 90, 0), ("credit", "u1", 95, 0)]
    session.commit()  # nothing new: nothing sent again
    assert len(sent) == 3


def test_not_sent_after_rollback(session: Session, sent: list[Change]) -> None:
    accounts.open_account(session, "u1", initial_balance=100)
    session.commit()
    movements.debit(session, "u1", 10, "image_generation")
    session.rollback()
    # A later transaction sends only its own change.
    movements.credit(session, "u1", 1)
    session.commit()
    assert sent == [("open_account", "u1", 100, 0), ("credit", "u1", 101, 0)]


def test_not_sent_for_a_refusal(session: Session, sent: list[Change]) -> None:
    accounts.open_account(session, "u1", initial_balance=5)
    session.commit()
    refused(session, movements.debit, "u1", 10, "image_generation")
    session.commit()
    assert sent == [("open_account", "u1", 5, 0)]


def test_not_sent_for_a_session_closed_without_commit(session: Session, sent: list[Change]) -> None:
    accounts.open_account(session, "u1", initial_balance=100)
    session.commit()
    movements.debit(session, "u1", 10, "image_generation")
    session.close()
    movements.credit(session, "u1", 1)  # the same session, used again
    session.commit()
    assert sent == [("open_account", "u1", 100, 0), ("credit", "u1", 101, 0)]


def test_savepoints(session: Session, sent: list[Change]) -> None:
    accounts.open_account(session, "u1", initial_balance=100)
    session.commit()
    movements.credit(session, "u1", 1)
    with session.begin_nested() as failed:
        movements.debit(session, "u1", 10, "image_generation")
        failed.rollback()
    with session.begin_nested():
        movements.debit(session, "u1", 20, "image_generation")
    # Releasing a savepoint commits nothing yet.
    assert sent == [("open_account", "u1", 100, 0)]
    session.commit()
    # The rolled-back savepoint's change is gone; the changes around it are sent.
    assert sent[1:] == [("credit", "u1", 101, 0), ("debit", "u1", 81, 0)]


def test_released_savepoint_rolled_back_with_its_transaction(
    session: Session, sent: list[Change]
) -> None:
    accounts.open_account(session, "u1", initial_balance=100)
    session.commit()
    with session.begin_nested():
        movements.debit(session, "u1", 20, "image_generation")
        with session.begin_nested():
            movements.debit(session, "u1", 5, "chatgpt_message")
    session.rollback()
    session.commit()
    assert sent == [("open_account", "u1", 100, 0)]
    assert accounts.get_balance(session, "u1").tokens_balance == 100


# --- handlers connected from configuration --------------------------------------------------


def test_resolve_takes_colon_or_dot_paths() -> None:
    from tests.worker import signal_sink
    from worker.signals import resolve

    assert resolve("tests.worker.signal_sink:on_balance_changed") is signal_sink.on_balance_changed
    assert resolve("tests.worker.signal_sink.on_operation_completed") is (
        signal_sink.on_operation_completed
    )
    with pytest.raises(ValueError, match="not a dotted path"):
        resolve("nodots")


def test_handlers_named_in_the_environment_run_in_a_real_worker(
    clean_db: None, app: Celery, tmp_path: Path
) -> None:
    sink = tmp_path / "signals.jsonl"
    queue = f"signals-{uuid.uuid4().hex[:8]}"
    env = {
        "TOKENS_TEST_SIGNAL_SINK": str(sink),
        "TOKENS_BALANCE_CHANGED_HANDLERS": '["tests.worker.signal_sink:on_balance_changed"]',
        # A dot before the function works as well as a colon.
        "TOKENS_OPERATION_COMPLETED_HANDLERS": json.dumps(
            ["tests.worker.signal_sink.on_operation_completed"]
        ),
    }
    with session_scope() as s:
        accounts.open_account(s, "u", initial_balance=100)
    worker = WorkerProcess(f"signals-{os.getpid()}", concurrency=1, env=env, queues=queue)
    with running_workers(app, worker):
        kwargs = {"user_id": "u", "amount": 30, "operation_type": "image_generation"}
        ok = app.send_task("tokens.debit", kwargs=kwargs, queue=queue).get(timeout=30)
        no = app.send_task("tokens.debit", kwargs=kwargs | {"amount": 300}, queue=queue).get(
            timeout=30
        )
    assert ok["success"] and no["error_code"] == "INSUFFICIENT_TOKENS"
    lines = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [(e["signal"], e.get("success")) for e in lines] == [
        ("balance_changed", None),
        ("operation_completed", True),
        ("operation_completed", False),
    ]
    changed, done, refused_op = lines
    assert (changed["user_id"], changed["balance"], changed["operation"]) == ("u", 70, "debit")
    assert {k: done[k] for k in ("operation", "user_id", "amount", "error_code")} == {
        "operation": "tokens.debit",
        "user_id": "u",
        "amount": -30,
        "error_code": None,
    }
    assert done["duration"] > 0
    assert (refused_op["amount"], refused_op["error_code"]) == (300, "INSUFFICIENT_TOKENS")
