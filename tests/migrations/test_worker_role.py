"""Migration 0026: the worker's role reads and appends to the ledger and can never change it;
everything the worker does still works as that role, pruning included (SECURITY DEFINER)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session

from accounting import accounts, chain, ledger, movements, outbox, renewals, reservations
from tests.support import assert_ledger_consistent
from worker.db import get_engine, make_engine


@pytest.fixture
def as_worker(session: Session) -> Iterator[Session]:
    """A session of its own, logged in as tokens_worker (trust authentication here; the
    suite's pooled connections never change role, so nothing leaks into other tests)."""
    session.execute(text("ALTER ROLE tokens_worker LOGIN"))  # as compose's `migrate` does
    session.commit()
    url = get_engine().url.set(username="tokens_worker")
    engine = make_engine(url.render_as_string(hide_password=False))
    try:
        with Session(engine) as worker_session:
            assert worker_session.execute(text("SELECT current_user")).scalar_one() == (
                "tokens_worker"
            )
            yield worker_session
    finally:
        engine.dispose()


def refused(session: Session, sql: str) -> str:
    with pytest.raises(ProgrammingError) as caught:
        session.execute(text(sql))
    session.rollback()
    return str(caught.value.orig)


def test_the_worker_role_may_never_change_a_ledger_entry(as_worker: Session) -> None:
    accounts.open_account(as_worker, "u", initial_balance=100)
    as_worker.commit()
    for sql in (
        "UPDATE ledger_entries SET tokens_amount = 1",
        "DELETE FROM ledger_entries",
        "TRUNCATE ledger_entries CASCADE",
        "UPDATE entry_grants SET amount = 1",
        "DELETE FROM entry_grants",
        "UPDATE alembic_version SET version_num = '0001'",
    ):
        assert "permission denied" in refused(as_worker, sql), sql
    assert as_worker.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one() == 1


def test_the_worker_role_has_no_right_on_any_of_the_ledgers_months(as_worker: Session) -> None:
    """Migrations 0036 and 0040: a partition named directly (the ledger's, the splits', the
    events') is refused, reads included (the parent is the way in), for the months the
    migration made and for one made later."""
    accounts.open_account(as_worker, "u", initial_balance=100)
    as_worker.commit()
    as_worker.execute(text("SELECT tokens_ledger_months(now() + interval '5 months')"))
    as_worker.commit()
    names = as_worker.execute(text("SELECT name FROM tokens_ledger_partitions()")).scalars().all()
    assert {"ledger_entries_before", "ledger_entries_after"} <= set(names)
    assert len(names) >= 2 + 5
    for name in names:
        for table, stamp in (
            (name, "created_at"),
            (name.replace("ledger_entries_", "entry_grants_"), "created_at"),
            (name.replace("ledger_entries_", "events_"), "at"),  # 0040: the events' months
        ):
            for verb in (
                "SELECT * FROM {0}",
                "UPDATE {0} SET {1} = now()",
                "DELETE FROM {0}",
                "TRUNCATE {0} CASCADE",
                "INSERT INTO {0} SELECT * FROM {0}",
            ):
                sql = verb.format(table, stamp)
                assert "permission denied" in refused(as_worker, sql), sql
    assert as_worker.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one() == 1


def test_everything_the_worker_does_works_as_its_role(as_worker: Session) -> None:
    accounts.open_account(as_worker, "u", initial_balance=100)
    accounts.open_account(as_worker, "m", parent_id="u")
    debit = movements.debit(as_worker, "u", 30, "image_generation")
    movements.debit(as_worker, "m", 5, "image_generation")
    movements.refund(as_worker, "u", 10, original_entry_id=debit.ledger_entry_id)
    movements.credit(as_worker, "u", 50)
    hold = reservations.reserve(as_worker, "u", 20)
    reservations.capture(as_worker, hold.reservation_id, 15)
    renewals.renew_user(as_worker, "u")
    as_worker.commit()
    assert len(ledger.user_entries(as_worker, "u").entries) == 7  # through tokens_page
    assert len(ledger.user_entries(as_worker, "m").entries) == 1
    assert len(ledger.entries_by_type(as_worker, "image_generation").entries) == 2
    last = as_worker.execute(text("SELECT max(created_at) FROM ledger_entries")).scalar_one()
    assert ledger.delete_old_entries(as_worker, last).deleted > 0  # through tokens_prune
    as_worker.commit()
    assert chain.verify(as_worker).broken == []
    while outbox.number(as_worker):
        pass
    assert outbox.prune(as_worker, 0, celery=False, webhook=False) > 0  # tokens_prune_event_months
    then = accounts.get_balance(as_worker, "u", as_of=datetime.now(UTC) + timedelta(seconds=1))
    assert then.tokens_balance == accounts.get_balance(as_worker, "u").tokens_balance
    assert_ledger_consistent(as_worker)
