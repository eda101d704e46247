"""The ``tokens`` CLI: migrate is safe to repeat, and each command gives what the domain gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from alembic.script import ScriptDirectory
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from accounting import accounts, ledger, reservations
from tests import dbstate
from tests.polling import wait_for
from tests.worker.tcp_proxy import TcpProxy
from worker.cli import main
from worker.migrate import alembic_config
from worker.settings import get_settings

TOKENS = Path(sys.executable).parent / "tokens"


def tokens(*args: str, code: int = 0) -> dict[str, Any]:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (result.output, result.exception)
    out: dict[str, Any] = json.loads(result.stdout)
    return out


# --- migrate --------------------------------------------------------------------------------


@pytest.fixture
def fresh_database() -> Any:
    url = make_url(get_settings().db_url)
    name = f"tokens_cli_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run_migrate(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TOKENS), "migrate", *args],
        env={**os.environ, "TOKENS_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_migrate_twice_is_safe_and_keeps_data(fresh_database: str) -> None:
    first = run_migrate(fresh_database)
    assert first.returncode == 0, first.stderr
    assert "schema up to date" in first.stdout
    engine = create_engine(fresh_database)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved,"
                    " tokens_spent, created_at, updated_at)"
                    " VALUES ('kept', 'Gift', 5, 0, 0, now(), now())"
                )
            )
        second = run_migrate(fresh_database)
        assert second.returncode == 0, second.stderr
        head = ScriptDirectory.from_config(alembic_config()).get_current_head()
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).all() == [(head,)]
            kept = conn.execute(text("SELECT tokens_balance FROM accounts")).scalar_one()
            tables = set(inspect(conn).get_table_names())
        assert kept == 5
        assert {"accounts", "ledger_entries", "idempotency_records", "reservations"} <= tables
    finally:
        engine.dispose()


def test_migrate_hides_the_password(fresh_database: str) -> None:
    with_password = make_url(fresh_database).set(password="s3cret").render_as_string(False)
    # The server trusts local connections, so a password is accepted and ignored.
    out = run_migrate(with_password)
    assert out.returncode == 0, out.stderr
    assert "s3cret" not in out.stdout + out.stderr
    assert "***" in out.stdout


def test_migrate_waits_for_the_database_within_a_bound(fresh_database: str) -> None:
    """``--wait`` (docker-compose.yml's migrate): a database that accepts only after a while
    is waited for; one that never does fails once the wait is over."""
    url = make_url(fresh_database)
    proxy = TcpProxy((str(url.host), int(url.port or 5432)))  # shut: resets every connection
    try:
        behind_proxy = url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)

        # Opened only once migrate has been turned away twice: it retried rather than gave up.
        def open_when_turned_away_twice() -> None:
            wait_for(lambda: proxy.refused >= 2, 30)
            proxy.open()

        opener = threading.Thread(target=open_when_turned_away_twice)
        opener.start()
        waited = run_migrate(behind_proxy, "--wait", "30")
        opener.join()
        assert waited.returncode == 0, waited.stderr
        assert "schema up to date" in waited.stdout

        proxy.shut()
        start = time.monotonic()
        gave_up = run_migrate(behind_proxy, "--wait", "1")
        assert gave_up.returncode != 0
        assert time.monotonic() - start < 20
    finally:
        proxy.close()


# --- commands against the domain ------------------------------------------------------------


def test_open_account_and_balance(session: Session) -> None:
    opened = tokens("open-account", "cli-user", "--tier", "Professional", "--initial-balance", "40")
    assert opened["created"] is True
    assert tokens("open-account", "cli-user")["created"] is False
    shown = tokens("balance", "cli-user")
    assert shown == accounts.get_balance(session, "cli-user").model_dump(mode="json")
    assert shown == {k: v for k, v in opened.items() if k != "created"}
    assert (shown["tier"], shown["tokens_balance"]) == ("Professional", 40)


def test_refusals_exit_1_with_the_contract_failure(session: Session) -> None:
    not_found = {"success": False, "error": "User not found", "error_code": "USER_NOT_FOUND"}
    assert tokens("balance", "ghost", code=1) == not_found
    assert tokens("credit", "ghost", "5", code=1) == not_found
    tokens("open-account", "u")
    assert tokens("credit", "u", "0", code=1) == {
        "success": False,
        "error": "Credit amount must be positive",
        "error_code": "INVALID_AMOUNT",
    }
    assert tokens("credit", "u", "5", "--operation-type", "bribe", code=1)["error_code"] == (
        "UNKNOWN_OPERATION_TYPE"
    )
    assert tokens("open-account", "v", "--tier", "Gold", code=1)["error_code"] == (
        "VALIDATION_ERROR"
    )
    assert dbstate.entries("u") == []


def test_renewal_commands(session: Session) -> None:
    tokens("open-account", "due", "--tier", "Professional")
    tokens("open-account", "also-due")
    assert tokens("eligibility", "due") == {
        "success": True,
        "user_id": "due",
        "eligible": True,
        "reason": "Never renewed",
        "next_renewal_date": None,
        "days_until_renewal": 0,
    }
    dry = tokens("sweep", "--dry-run")
    assert (dry["total_processed"], dry["successful"]) == (2, 2)
    assert dbstate.entries("due") == []
    renewed = tokens("renew", "due")
    assert (renewed["tokens_added"], renewed["new_balance"]) == (2000, 2000)
    assert tokens("renew", "due", code=1)["error_code"] == "NOT_DUE"
    swept = tokens("sweep", "--tier", "Gift")
    assert (swept["total_processed"], swept["successful"], swept["failed"]) == (1, 1, 0)
    assert tokens("sweep")["total_processed"] == 0  # everyone renewed this period
    assert tokens("eligibility", "due")["reason"] == "Next renewal in 30 days"
    assert tokens("sweep", "--tier", "Gold", code=1)["error_code"] == "VALIDATION_ERROR"


def test_expire_reservations(session: Session) -> None:
    tokens("open-account", "u", "--initial-balance", "100")
    now = datetime.now(UTC)
    held = reservations.reserve(session, "u", amount=30, ttl_seconds=60)
    reservations.reserve(session, "u", amount=20, ttl_seconds=600)
    session.execute(
        text("UPDATE reservations SET expires_at = :past WHERE id = :id"),
        {"past": now - timedelta(seconds=1), "id": held.reservation_id},
    )
    session.commit()
    assert tokens("expire-reservations") == {"success": True, "expired": 1}
    assert tokens("expire-reservations") == {"success": True, "expired": 0}
    assert tokens("balance", "u")["tokens_reserved"] == 20


def test_credit_with_idempotency_key(session: Session) -> None:
    tokens("open-account", "u", "--initial-balance", "10")
    first = tokens("credit", "u", "25", "--idempotency-key", "ops-1")
    assert (first["amount"], first["new_balance"], first["replayed"]) == (25, 35, False)
    assert tokens("credit", "u", "25", "--idempotency-key", "ops-1") == {**first, "replayed": True}
    assert tokens("credit", "u", "26", "--idempotency-key", "ops-1", code=1)["error_code"] == (
        "IDEMPOTENCY_CONFLICT"
    )
    assert accounts.get_balance(session, "u").tokens_balance == 35
    [_, entry] = dbstate.entries("u")
    assert (str(entry["id"]), entry["operation_type"]) == (first["ledger_entry_id"], "purchase")


def test_reset_balance_and_history(session: Session) -> None:
    tokens("open-account", "u", "--initial-balance", "10")
    out = tokens("reset-balance", "u", "3", "--reason", "support ticket")
    assert (out["operation_type"], out["amount"], out["new_balance"]) == ("adjustment", -7, 3)
    history = tokens("history", "u")
    assert history == ledger.user_entries(session, "u", limit=20).model_dump(mode="json")
    assert [e["tokens_amount"] for e in history["entries"]] == [-7, 10]
    assert history["entries"][0]["metadata"]["reason"] == "support ticket"
    assert len(tokens("history", "u", "--limit", "1")["entries"]) == 1


def test_reconcile_exits_1_on_mismatch(session: Session) -> None:
    tokens("open-account", "u", "--initial-balance", "10")
    assert tokens("reconcile") == {"success": True, "checked": 1, "mismatches": []}
    dbstate.execute("UPDATE accounts SET tokens_balance = 11 WHERE user_id = 'u'")
    expected = ledger.reconcile(session).model_dump(mode="json")
    assert tokens("reconcile", code=1) == expected
    assert expected["mismatches"] == [{"user_id": "u", "balance": 11, "ledger_sum": 10}]
    assert tokens("reconcile", "--user-id", "nobody") == {
        "success": True,
        "checked": 0,
        "mismatches": [],
    }


def test_delete_old_entries(session: Session) -> None:
    tokens("open-account", "u", "--initial-balance", "10")
    tokens("credit", "u", "5")
    for entry in dbstate.entries("u"):
        dbstate.backdate(entry["id"], datetime(2025, 6, 1, tzinfo=UTC))
    tokens("credit", "u", "1")
    assert tokens("delete-old-entries", "2026-01-01") == {"success": True, "deleted": 2}
    amounts = sorted(e["tokens_amount"] for e in dbstate.entries("u"))
    assert amounts == [1, 15]
    assert tokens("reconcile") == {"success": True, "checked": 1, "mismatches": []}


@pytest.mark.parametrize(
    "args",
    [
        ["open-account", "   "],
        ["open-account", ""],
        ["open-account", "a\nb"],
        ["open-account", "u" * 129],
        ["open-account", "u", "--initial-balance", str(10**12 + 1)],
        ["balance", "a\x00b"],
        ["credit", "u", str(10**12 + 1)],
        ["credit", "u", "5", "--idempotency-key", "k" * 256],
        ["reset-balance", "u", "5", "--reason", "a\x00"],
        ["history", "\t"],
        ["reconcile", "--user-id", " "],
    ],
)
def test_arguments_follow_the_task_rules(session: Session, args: list[str]) -> None:
    tokens("open-account", "u", "--initial-balance", "10")
    before = dbstate.snapshot()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output  # a usage error, before any database work
    assert "Invalid value" in result.output
    assert dbstate.snapshot() == before
