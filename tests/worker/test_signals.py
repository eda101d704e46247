"""worker/signals.py: ``balance_changed`` is sent after the commit, never for a rollback."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting import accounts, movements
from tests.support import refused
from worker.db import get_engine
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
