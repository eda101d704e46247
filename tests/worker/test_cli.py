"""The ``tokens`` CLI: migrate is safe to repeat, and each command gives what the domain gives."""

from __future__ import annotations

import importlib
import importlib.metadata
import itertools
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from inspect import signature
from pathlib import Path
from typing import Any

import click
import psycopg
import pytest
import redis
from alembic.script import ScriptDirectory
from celery import Celery
from click.testing import CliRunner
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from accounting import accounts, ledger, movements, renewals, reservations
from accounting import grants as grant_rows
from tests import dbstate
from tests.polling import wait_for
from tests.support import ROOT, assert_ledger_consistent
from tests.worker.tcp_proxy import TcpProxy
from token_worker_client import contract
from worker.cli import main
from worker.cli.generated import TaskCommand
from worker.migrate import alembic_config
from worker.settings import get_settings

TOKENS = Path(sys.executable).parent / "tokens"


def tokens(*args: str, code: int = 0) -> dict[str, Any]:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == code, (result.output, result.exception)
    out: dict[str, Any] = json.loads(result.stdout)
    return out


# --- the command itself -------------------------------------------------------------------

HEAVY = {"accounting", "alembic", "celery", "kombu", "models", "pydantic", "redis", "sqlalchemy",
         "token_worker_client"}  # fmt: skip
LOADED_BY_HELP = """
import sys
from click.testing import CliRunner
from worker.cli import main
assert CliRunner().invoke(main, ["--help"]).exit_code == 0
print(" ".join(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_help_answers_at_once_and_loads_nothing_heavy() -> None:
    """Every command took ~2 s, --help included: the CLI imported Celery, SQLAlchemy and the
    domain up front. They load inside the commands that need them."""
    loaded = subprocess.run([sys.executable, "-c", LOADED_BY_HELP], capture_output=True,
                            text=True, timeout=60, check=True).stdout.split()  # fmt: skip
    assert HEAVY.isdisjoint(loaded), HEAVY & set(loaded)

    def once() -> float:
        started = time.perf_counter()
        subprocess.run([str(TOKENS), "--help"], capture_output=True, timeout=60, check=True)
        return time.perf_counter() - started

    assert min(once() for _ in range(5)) < 0.3


def test_version_is_the_distributions() -> None:
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"tokens, version {importlib.metadata.version('token-worker')}\n"


def mirrored(group: click.Group = main) -> Iterator[TaskCommand]:
    for command in group.commands.values():
        if isinstance(command, click.Group):
            yield from mirrored(command)
        elif isinstance(command, TaskCommand):
            yield command


def test_commands_that_mirror_tasks_take_the_tasks_kwargs_model() -> None:
    """Each mirroring command's parameters are its task's payload fields (then its own), its
    task's model is the contract's for that task name, and the domain function it calls accepts
    every field by name."""
    specs = {s.name: s for s in vars(contract).values() if isinstance(s, contract.Spec)}
    commands = list(mirrored())
    assert {c.name for c in commands} >= {"debit", "credit", "reserve", "history", "sweep"}
    for command in commands:
        model = command.fields.model()
        names = [p.name for p in command.params]
        assert names[: len(model.model_fields)] == [
            *command.fields.arguments,
            *(f for f in model.model_fields if f not in command.fields.arguments),
        ], command.name
        if command.task is None:
            continue
        assert specs[command.task].payload is model, command.name
        module, _, function = (command.call or "").partition(":")
        action = getattr(importlib.import_module(module), function)
        signature(action).bind(None, **dict.fromkeys(model.model_fields))


def every_command(group: click.Group = main, path: tuple[str, ...] = ()) -> Iterator[list[str]]:
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from every_command(command, (*path, name))
        else:
            yield [*path, name]


def test_every_command_explains_itself() -> None:
    """Each command's --help renders (the generated ones build their options from the model
    only then), and names every option it takes."""
    for path in every_command():
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output, result.exception)
        assert f"Usage: main {' '.join(path)}" in result.stdout
    debit = CliRunner().invoke(main, ["debit", "--help"]).stdout
    for option in ("--operation-type", "--allow-overdraft", "--metadata", "--idempotency-key"):
        assert option in debit


def test_options_come_from_the_model(session: Session) -> None:
    """Fields the CLI never declared one by one are there, typed and checked as the task checks
    them (open_account's subscription end and last renewal, history's filters)."""
    opened = tokens("open-account", "imported", "--tier", "Professional",
                    "--subscription-expires-at", "2999-01-01",
                    "--last-renewal-at", "2026-01-01T00:00:00+00:00")  # fmt: skip
    assert (opened["subscription_expires_at"], opened["last_renewal_at"]) == (
        "2999-01-01T00:00:00+00:00",
        "2026-01-01T00:00:00+00:00",
    )
    tokens("credit", "imported", "5")
    tokens("debit", "imported", "2", "--operation-type", "image_generation")
    only = tokens("history", "imported", "--operation-type", "purchase", "--limit", "5")
    assert [e["tokens_amount"] for e in only["entries"]] == [5]
    assert tokens("can-afford", "imported", "image_generation") == {
        "success": True, "can_afford": False, "cost": 10, "balance": 3, "deficit": 7,
    }  # fmt: skip


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


def test_a_debit_a_limit_refuses_writes_limit_reached_as_the_task_does(session: Session) -> None:
    """Refused from the command line as from a task: LIMIT_EXCEEDED, nothing moved, and the
    window's limit.reached written once after the request rolled back."""
    tokens("open-account", "capped", "--initial-balance", "50")
    tokens("set-limit", "capped", "daily", "--max-tokens", "10", "--period", "day")
    tokens("debit", "capped", "6", "--operation-type", "image_generation")
    for _ in range(2):
        refused = tokens("debit", "capped", "5", "--operation-type", "image_generation", code=1)
        assert refused["error_code"] == "LIMIT_EXCEEDED"
    reached = session.execute(
        text("SELECT user_id, data FROM events WHERE type = 'limit.reached'")
    ).all()
    assert [(r.user_id, r.data["name"], r.data["used"]) for r in reached] == [
        ("capped", "daily", 6)
    ]
    assert dbstate.balance("capped") == 44


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


def test_grants_from_the_command_line_settle_and_expire(session: Session) -> None:
    """The v1.1 commands: a promo credit with its end and priority, a hold with an over-capture
    limit, extended and captured past the hold into debt, and expire-grants writing off a due
    grant."""
    tokens("open-account", "u", "--initial-balance", "10")
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    promo = tokens("credit", "u", "40", "--grant-kind", "promo", "--expires-at", soon)
    assert promo["new_balance"] == 50
    listed = tokens("grants", "u", "--json")["grants"]
    assert [(g["kind"], g["priority"], g["remaining"]) for g in listed] == [
        ("promo", 20, 40),
        ("adjustment", 50, 10),
    ]
    held = tokens("reserve", "u", "--amount", "30", "--overcapture-limit", "50")
    grown = tokens("extend", held["reservation_id"], "--amount", "15", "--ttl-seconds", "60")
    assert (grown["amount"], grown["tokens_available"]) == (45, 5)
    captured = tokens("capture", held["reservation_id"], "--amount", "60")
    assert (captured["new_balance"], captured["overcaptured"], captured["shortfall"]) == (
        -10,
        15,
        10,
    )
    assert tokens("balance", "u")["debt"] == 10
    assert tokens("credit", "u", "25", "--expires-at", soon)["new_balance"] == 15
    session.execute(text("UPDATE grants SET expires_at = now() - interval '1 second'"))
    session.commit()
    assert tokens("expire-grants") == {"success": True, "expired": 1, "tokens_expired": 15}
    assert tokens("expire-grants") == {"success": True, "expired": 0, "tokens_expired": 0}
    assert tokens("balance", "u")["tokens_balance"] == 0
    refused = tokens("credit", "u", "5", "--expires-at", "2020-01-01T00:00:00Z", code=1)
    assert refused["error_code"] == "VALIDATION_ERROR"
    assert_ledger_consistent(session)


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


def test_verify_exits_1_on_a_broken_chain(session: Session) -> None:
    tokens("open-account", "u", "--initial-balance", "10")
    assert tokens("verify") == {"success": True, "checked": 1, "broken": []}
    dbstate.execute("UPDATE ledger_entries SET metadata = '{\"x\": 1}' WHERE user_id = 'u'")
    (entry,) = dbstate.entries("u")
    assert tokens("verify", code=1) == {
        "success": True,
        "checked": 1,
        "broken": [{"user_id": "u", "entry_id": str(entry["id"]), "reason": "hash"}],
    }


def test_reconcile_exits_1_on_mismatch(session: Session) -> None:
    tokens("open-account", "u", "--initial-balance", "10")
    assert tokens("reconcile") == {"success": True, "checked": 1, "mismatches": []}
    dbstate.execute("UPDATE accounts SET tokens_balance = 11 WHERE user_id = 'u'")
    expected = ledger.reconcile(session).model_dump(mode="json")
    assert tokens("reconcile", code=1) == expected
    assert expected["mismatches"] == [
        {"user_id": "u", "balance": 11, "ledger_sum": 10, "grants_balance": 10, "bad_grants": []}
    ]
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
    assert tokens("delete-old-entries", "2026-01-01", "--yes") == {"success": True, "deleted": 2}
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
        ["open-account", "u", "--subscription-expires-at", "3000-01-01"],
        ["debit", "u", "5", "--operation-type", "image_generation", "--metadata", "[1]"],
        ["history", "u", "--limit", "0"],
        ["delete-old-entries", "not-a-date"],
        ["credit", "u", "5", "--grant-kind", "gift"],
    ],
)
def test_arguments_follow_the_task_rules(session: Session, args: list[str]) -> None:
    tokens("open-account", "u", "--initial-balance", "10")
    before = dbstate.snapshot()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output  # a usage error, before any database work
    assert "Invalid value" in result.output
    assert dbstate.snapshot() == before


# --- movements, reservations, statistics: what the domain gives -------------------------------


def replayed(out: dict[str, Any]) -> dict[str, Any]:
    return {**out, "replayed": True}


def test_movement_commands(session: Session) -> None:
    tokens("open-account", "u", "--initial-balance", "100")
    debited = tokens(
        "debit", "u", "30", "--operation-type", "image_generation",
        "--metadata", '{"job": "j-1"}', "--idempotency-key", "d1",
    )  # fmt: skip
    # The same request to the domain replays what the command did.
    again = movements.debit(session, "u", 30, "image_generation", metadata={"job": "j-1"},
                            idempotency_key="d1")  # fmt: skip
    assert replayed(debited) == again.model_dump(mode="json")
    assert (debited["amount"], debited["new_balance"]) == (-30, 70)
    charged = tokens("charge", "u", "chatgpt_message", "--idempotency-key", "c1")
    assert replayed(charged) == movements.charge(
        session, "u", "chatgpt_message", idempotency_key="c1"
    ).model_dump(mode="json")
    refunded = tokens(
        "refund", "u", "10", "--original-entry-id", debited["ledger_entry_id"],
        "--reason", "failed job", "--idempotency-key", "r1",
    )  # fmt: skip
    assert replayed(refunded) == movements.refund(
        session, "u", 10, reason="failed job", original_entry_id=debited["ledger_entry_id"],
        idempotency_key="r1",
    ).model_dump(mode="json")  # fmt: skip
    session.rollback()
    assert tokens("balance", "u")["tokens_balance"] == 100 - 30 - 5 + 10
    [entry] = [e for e in dbstate.entries("u") if str(e["id"]) == debited["ledger_entry_id"]]
    assert entry["metadata"] == {"job": "j-1"}


def test_movement_refusals_exit_1_with_the_contract_failure(session: Session) -> None:
    tokens("open-account", "u", "--initial-balance", "10")
    before = dbstate.snapshot()
    assert tokens("debit", "u", "11", "--operation-type", "image_generation", code=1) == {
        "success": False,
        "error": "Insufficient tokens. Required: 11, Available: 10",
        "error_code": "INSUFFICIENT_TOKENS",
    }
    assert tokens("charge", "u", "refund", code=1)["error_code"] == "NOT_CHARGEABLE"
    assert tokens("refund", "u", "5", "--original-entry-id", "999", code=1)["error_code"] == (
        "ENTRY_NOT_FOUND"
    )
    assert tokens("set-tier", "u", "Gold", code=1)["error_code"] == "VALIDATION_ERROR"
    assert tokens("reserve", "u", code=1)["error_code"] == "VALIDATION_ERROR"
    assert tokens("capture", "no-such-reservation", code=1)["error_code"] == (
        "RESERVATION_NOT_FOUND"
    )
    assert dbstate.snapshot() == before
    usage = CliRunner().invoke(
        main, ["debit", "u", "1", "--operation-type", "x", "--metadata", "{"]
    )
    assert usage.exit_code == 2 and "not JSON" in usage.output


def test_debit_with_overdraft(session: Session) -> None:
    tokens("open-account", "u", "--initial-balance", "5")
    out = tokens("debit", "u", "8", "--operation-type", "image_generation", "--allow-overdraft")
    assert (out["new_balance"], out["tokens_spent"]) == (-3, 8)


def test_set_tier(session: Session) -> None:
    tokens("open-account", "u")
    out = tokens("set-tier", "u", "Business", "--subscription-expires-at", "2031-02-03T04:05:06")
    assert out == accounts.get_balance(session, "u").model_dump(mode="json")
    assert (out["tier"], out["subscription_expires_at"]) == (
        "Business",
        "2031-02-03T04:05:06+00:00",
    )
    assert tokens("set-tier", "u", "Gift")["subscription_expires_at"] is None


def test_reserve_capture_release(session: Session) -> None:
    tokens("open-account", "u", "--initial-balance", "100")
    held = tokens("reserve", "u", "--amount", "50", "--ttl-seconds", "600",
                  "--idempotency-key", "h1")  # fmt: skip
    assert replayed(held) == reservations.reserve(
        session, "u", amount=50, ttl_seconds=600, idempotency_key="h1"
    ).model_dump(mode="json")
    session.rollback()
    assert (held["amount"], held["tokens_available"]) == (50, 50)
    priced = tokens("reserve", "u", "--operation-type", "chatgpt_message")
    assert priced["amount"] == 5
    captured = tokens("capture", held["reservation_id"], "--amount", "40")
    assert (captured["amount"], captured["new_balance"]) == (-40, 60)
    [entry] = [e for e in dbstate.entries("u") if str(e["id"]) == captured["ledger_entry_id"]]
    assert entry["tokens_amount"] == -40
    assert tokens("release", priced["reservation_id"], "--reason", "cancelled") == {
        "success": True,
        "reservation_id": priced["reservation_id"],
        "status": "released",
    }
    assert tokens("release", held["reservation_id"], code=1) == {
        "success": False,
        "error": "Reservation is captured",
        "error_code": "RESERVATION_NOT_ACTIVE",
    }
    assert tokens("balance", "u")["tokens_reserved"] == 0


def test_stats_due_and_account_show(session: Session) -> None:
    tokens("open-account", "u", "--tier", "Professional", "--initial-balance", "50")
    tokens("debit", "u", "20", "--operation-type", "image_generation")
    stats = tokens("stats", "u")
    assert stats == ledger.statistics(session, "u").model_dump(mode="json")
    assert (stats["total_spent"], stats["total_earned"], stats["operation_count"]) == (20, 50, 2)
    future = tokens("stats", "u", "--start-date", "2999-01-01")
    assert (future["operation_count"], future["by_type"]) == (0, {})
    assert tokens("due") == {"success": True, "user_ids": ["u"]}
    assert tokens("due", "--tier", "Gift") == {"success": True, "user_ids": []}
    shown = tokens("account", "show", "u", "--limit", "1")
    assert shown == {
        "success": True,
        "balance": accounts.get_balance(session, "u").model_dump(mode="json"),
        "renewal": renewals.check_eligibility(session, "u").model_dump(mode="json"),
        "statistics": stats,
        "entries": ledger.user_entries(session, "u", limit=1).model_dump(mode="json")["entries"],
    }
    assert tokens("account", "show", "ghost", code=1)["error_code"] == "USER_NOT_FOUND"


def test_delete_old_entries_dry_run_and_confirmation(session: Session) -> None:
    for user in ("a", "b", "c"):
        tokens("open-account", user, "--initial-balance", "10")
        tokens("credit", user, "5")
    for user in ("a", "b"):
        for entry in dbstate.entries(user):
            dbstate.backdate(entry["id"], datetime(2025, 6, 1, tzinfo=UTC))
    before = dbstate.snapshot()
    # A dry run says what it would delete, never that it deleted.
    assert tokens("delete-old-entries", "2026-01-01", "--dry-run") == {
        "success": True,
        "dry_run": True,
        "would_delete": 4,
        "users": 2,
    }
    declined = CliRunner().invoke(main, ["delete-old-entries", "2026-01-01"], input="n\n")
    assert declined.exit_code == 1
    assert "Delete 4 ledger entries created before 2026-01-01T00:00:00+00:00 of 2 users" in (
        declined.stderr
    )
    assert dbstate.snapshot() == before
    confirmed = CliRunner().invoke(
        main, ["delete-old-entries", "2026-01-01", "--users-per-transaction", "1"], input="y\n"
    )
    assert confirmed.exit_code == 0, confirmed.output
    assert json.loads(confirmed.stdout) == {"success": True, "deleted": 4}
    assert "pruning" in confirmed.stderr  # the progress bar (a label only, off a terminal)
    assert [e["operation_type"] for e in dbstate.entries("a")] == ["carried_forward"]
    assert tokens("reconcile")["mismatches"] == []


def test_sweep_keeps_stdout_for_its_result(session: Session) -> None:
    tokens("open-account", "u")
    result = CliRunner().invoke(main, ["sweep"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["successful"] == 1
    assert "renewing" in result.stderr


# --- migrate --wait, handlers, doctor -----------------------------------------------------------


def test_migrate_waits_for_the_database_then_gives_up_in_one_line(fresh_database: str) -> None:
    from tests.worker.tcp_proxy import TcpProxy

    url = make_url(fresh_database)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        through = url.set(host="127.0.0.1", port=proxy.port).render_as_string(False)
        env = {**os.environ, "TOKENS_DATABASE_URL": through}
        argv = [str(TOKENS), "migrate", "--wait", "2"]
        gave_up = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        assert gave_up.returncode == 3
        [line] = gave_up.stderr.splitlines()
        assert line.startswith(
            f"tokens: database {make_url(through).render_as_string()} unreachable after 2 s: "
            f'connection failed: connection to server at "127.0.0.1", port {proxy.port} failed'
        )
        threading.Timer(1.0, proxy.open).start()  # the database comes up while it waits
        argv = [str(TOKENS), "migrate", "--wait", "30"]
        waited = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        assert waited.returncode == 0, waited.stderr
        assert "schema up to date" in waited.stdout
        assert proxy.refused >= 2
    finally:
        proxy.close()


def test_configured_handlers_fire_for_a_cli_debit(session: Session, tmp_path: Path) -> None:
    tokens("open-account", "u", "--initial-balance", "100")
    sink = tmp_path / "signals.jsonl"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),  # where tests.worker.signal_sink lives
        "TOKENS_TEST_SIGNAL_SINK": str(sink),
        "TOKENS_BALANCE_CHANGED_HANDLERS": '["tests.worker.signal_sink:on_balance_changed"]',
        "TOKENS_OPERATION_COMPLETED_HANDLERS": json.dumps(
            ["tests.worker.signal_sink.on_operation_completed"]
        ),
    }
    argv = [str(TOKENS), "debit", "u", "30", "--operation-type", "image_generation"]
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    argv[3] = "300"
    refused_out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert refused_out.returncode == 1
    events = [json.loads(line) for line in sink.read_text().splitlines()]
    assert [(e["signal"], e.get("success")) for e in events] == [
        ("balance_changed", None),
        ("operation_completed", True),
        ("operation_completed", False),
    ]
    changed, done, refused_op = events
    assert (changed["user_id"], changed["balance"], changed["operation"]) == ("u", 70, "debit")
    assert {
        k: done[k] for k in ("operation", "task_id", "user_id", "amount", "operation_type")
    } == {
        "operation": "tokens.debit",
        "task_id": None,
        "user_id": "u",
        "amount": -30,
        "operation_type": "image_generation",
    }
    assert (refused_op["amount"], refused_op["error_code"]) == (300, "INSUFFICIENT_TOKENS")


def doctor(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[list[str]]]:
    argv = [str(TOKENS), "doctor", "--timeout", "1", *args]
    out = subprocess.run(argv, env=env or dict(os.environ), capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert out.stderr == ""
    return out.returncode, [line.split(None, 2) for line in out.stdout.splitlines()]


@pytest.fixture
def beat_lock() -> Iterator[tuple[redis.Redis, str]]:
    from worker.celery import app

    client = redis.Redis.from_url(app.conf.redbeat_redis_url)
    key = f"{app.conf.redbeat_key_prefix}:lock"
    assert key == "tokens:redbeat::lock"
    client.delete(key)  # left by an earlier test's beat
    try:
        yield client, key
    finally:
        client.delete(key)
        client.close()


def test_doctor_names_what_is_wrong(
    e2e: Celery, beat_lock: tuple[redis.Redis, str], fresh_database: str
) -> None:
    from tests.test_beat_schedule import Beat

    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    code, lines = doctor()
    assert code == 1
    assert [line[:2] for line in lines] == [
        ["ok", "database"], ["ok", "schema"], ["ok", "broker"], ["ok", "backend"],
        ["FAIL", "beat"], ["ok", "workers"],
    ]  # fmt: skip
    assert lines[1][2] == f"at head {head}"
    assert lines[4][2] == (
        "no beat holds tokens:redbeat::lock: renewals, expiries, reconcile and pruning are not "
        "scheduled; start `celery -A worker beat`"
    )
    assert lines[5][2].startswith("2 answered: ")
    assert "(celery, renewals)" in lines[5][2]

    beat = Beat("doctor-beat")
    try:
        wait_for(lambda: "beat: Acquired lock" in beat.log(), 60, "the beat to take its lock")
        code, lines = doctor()
        assert code == 0, lines
        assert [line[0] for line in lines] == ["ok"] * 6
        assert lines[4][2].startswith("tokens:redbeat::lock held; expires in ")
    finally:
        beat.stop()

    # No broker, an unmigrated database: each named, the workers not asked.
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    closed = port.getsockname()[1]
    port.close()
    env = {**os.environ, "TOKENS_BROKER_URL": f"redis://default:pw@127.0.0.1:{closed}/0"}
    code, lines = doctor(env=env)
    assert code == 1
    assert lines[2] == [
        "FAIL", "broker",
        f"broker redis://default:***@127.0.0.1:{closed}/0 unreachable: Error 111 connecting to "
        f"127.0.0.1:{closed}. Connection refused",
    ]  # fmt: skip
    assert lines[4][:2] == ["FAIL", "beat"]  # its lock lives on the broker's Redis here
    assert lines[5] == ["skip", "workers", "the broker is unreachable"]

    code, lines = doctor(env={**os.environ, "TOKENS_DATABASE_URL": fresh_database})
    assert code == 1
    assert lines[0][:2] == ["ok", "database"]
    assert lines[1] == [
        "FAIL", "schema", f"database {fresh_database} is not migrated: run `tokens migrate`"
    ]  # fmt: skip


# --- the operator guide's command list ----------------------------------------------------------


def guide_commands() -> list[str]:
    text = (ROOT / "docs" / "operators.md").read_text()
    block = text.split("## The `tokens` CLI", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_every_command_in_the_operator_guide_runs(
    e2e: Celery, beat_lock: tuple[redis.Redis, str]
) -> None:
    client, key = beat_lock
    client.set(key, "a-beat", px=150_000)  # as a running beat holds it (test_doctor_…: a real one)
    lines = guide_commands()
    assert len(lines) >= 20
    printed: dict[str, dict[str, Any]] = {}
    reserve_line = ""
    for line in lines:
        argv = shlex.split(line, comments=True)
        assert argv[0] == "tokens", line
        if argv[1] == "release":
            # The hold `reserve` printed was captured on the line before: take a new one.
            printed["reserve"] = json.loads(
                run_guide_line(shlex.split(reserve_line, comments=True)).stdout
            )
        argv = [
            printed["debit"]["ledger_entry_id"] if arg == "ENTRY_ID"
            else printed["reserve"]["reservation_id"] if arg == "RESERVATION_ID"
            else arg
            for arg in argv
        ]  # fmt: skip
        result = run_guide_line(argv)
        assert result.exit_code == 0, (line, result.output, result.exception)
        if argv[1] not in ("migrate", "doctor"):  # these print lines of text
            printed[argv[1]] = json.loads(result.stdout)
            assert printed[argv[1]]["success"] is True
        if argv[1] == "reserve":
            reserve_line = line
    assert printed["capture"]["amount"] == -40
    assert printed["renew"]["tokens_added"] == 10000  # bob was set to Business on the way
    assert printed["reconcile"]["mismatches"] == []


def run_guide_line(argv: list[str]) -> Any:
    return CliRunner().invoke(main, argv[1:])


def checks(stdout: str) -> dict[str, tuple[str, str]]:
    """``tokens doctor``'s lines by check: (status, detail)."""
    return {name: (status, detail) for status, name, detail in
            (line.split(None, 2) for line in stdout.splitlines())}  # fmt: skip


def test_doctor_on_the_embedded_default_with_no_worker(tmp_path: Path) -> None:
    """What a new user saw: no worker running, and doctor said all was well (the embedded broker
    cannot broadcast, so the workers were skipped). No worker answering is a problem: either
    the broker is not there, or a worker must answer."""
    bare = {k: v for k, v in os.environ.items() if not k.startswith("TOKENS_")}
    out = subprocess.run([str(TOKENS), "doctor", "--timeout", "1"], cwd=tmp_path, env=bare,
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert out.returncode == 1
    found = checks(out.stdout)
    assert found["workers"][0] == "FAIL" or found["broker"][0] == "FAIL", out.stdout


DOCTOR_WITHOUT_BROADCAST = """
import sys
import worker.doctor
worker.doctor.broadcasts = lambda app: False  # as on kombu's SQLAlchemy transport
from worker.cli import main
main(["doctor", "--timeout", "1"])
"""


def test_doctor_asks_a_worker_where_the_broker_cannot_broadcast(e2e: Celery) -> None:
    """Without broadcast, doctor sends health.ping as a producer would: the session's workers
    answer it; on a broker no worker consumes, nothing answers and that is a failure (exit 1)."""

    def doctor_without_broadcast(broker: str) -> tuple[int, dict[str, tuple[str, str]]]:
        env = {**os.environ, "TOKENS_BROKER_URL": broker, "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, "-c", DOCTOR_WITHOUT_BROADCAST]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
        return out.returncode, checks(out.stdout)

    settings = get_settings()
    _, served = doctor_without_broadcast(settings.broker)
    assert served["workers"] == ("ok", "a worker answered health.ping (queues not listed)")
    # The result backend's Redis database: a broker no worker of the session consumes.
    code, unserved = doctor_without_broadcast(settings.backend)
    assert code == 1
    assert unserved["workers"] == ("FAIL", "no worker answered health.ping within 1 s")


def test_doctor_fails_when_no_worker_answers_a_broadcast() -> None:
    env = {**os.environ, "TOKENS_BROKER_URL": get_settings().backend}  # no worker consumes it
    code, lines = doctor(env=env)
    assert code == 1
    assert checks("\n".join(" ".join(line) for line in lines))["workers"] == (
        "FAIL",
        "no worker answered within 1 s",
    )


def test_grants_shows_a_users_grants_in_burn_order_and_the_debt(session: Session) -> None:
    accounts.open_account(session, "g", initial_balance=100)  # adjustment, priority 50
    ends = datetime.now(UTC) + timedelta(days=10)
    movements.credit(session, "g", 30, grant_kind="promo", expires_at=ends)  # priority 20
    movements.credit(session, "g", 50, grant_kind="purchased", priority=5)
    movements.debit(session, "g", 60, "image_generation")  # all 50 purchased, then 10 promo
    reservations.reserve(session, "g", amount=25)  # 20 promo, then 5 adjustment
    accounts.open_account(session, "d")
    movements.debit(session, "d", 15, "image_generation", allow_overdraft=True)
    session.commit()

    def shown(*args: str) -> list[tuple[Any, ...]]:
        out = tokens("grants", *args)
        assert out == grant_rows.list_grants(
            session, args[0], include_ended="--all" in args or "--include-ended" in args
        ).model_dump(mode="json")
        keys = ("kind", "status", "remaining", "amount", "held", "expires_at", "priority")
        return [tuple(g[k] for k in keys) for g in out["grants"]]

    # JSON like every other command (it printed a table unless --json), in burn order.
    assert shown("g") == [
        ("promo", "active", 20, 30, 20, ends.isoformat(), 20),
        ("adjustment", "active", 100, 100, 5, None, 50),
    ]
    assert shown("g", "--all")[2] == ("purchased", "depleted", 0, 50, 0, None, 5)
    assert shown("g", "--include-ended") == shown("g", "--all")
    assert tokens("grants", "d") == {"success": True, "user_id": "d", "grants": [], "debt": 15}
    assert tokens("grants", "g", "--json") == tokens("grants", "g")  # still accepted
    assert tokens("grants", "ghost", code=1)["error_code"] == "USER_NOT_FOUND"
    assert_ledger_consistent(session)


def test_months_lists_the_ledgers_partitions_and_makes_the_missing_ones_ahead() -> None:
    listed = tokens("months")
    assert listed["made"] == []
    names = [m["name"] for m in listed["months"]]
    assert names[0] == "ledger_entries_before" and names[-1] == "ledger_entries_after"
    assert listed["months"][0]["lower"] is None and listed["months"][-1]["upper"] is None
    months = listed["months"][1:-1]
    assert all(a["upper"] == b["lower"] for a, b in itertools.pairwise(months))
    grown = tokens("months", "--make", "5")
    assert len(grown["months"]) == len(names) + len(grown["made"])
    assert tokens("months", "--make", "5")["made"] == []
