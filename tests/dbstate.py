"""Read the database directly, to check what a task did (or did not) change."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text

from worker.db import get_engine

ENTRY_KEYS = {
    "id",
    "user_id",
    "operation_type",
    "tokens_amount",
    "balance_before",
    "balance_after",
    "idempotency_key",
    "original_entry_id",
    "metadata",
    "created_at",
    "grants",  # v1.1
    "prev_hash",  # v1.2
    "hash",
    "spent_by",  # v1.2 pools: the member that spent it (null: the account's own)
}
BALANCE_KEYS = {
    "success",
    "user_id",
    "tokens_balance",
    "tokens_reserved",
    "tokens_available",
    "tokens_spent",
    "tier",
    "last_renewal_at",
    "subscription_expires_at",
    # v1.1
    "by_kind",
    "debt",
    "next_expiry",
    # v1.2 (both null for a pool, which every account outside a tree is)
    "pool_id",
    "parent_id",
}
MOVEMENT_KEYS = {
    "success",
    "user_id",
    "operation_type",
    "amount",
    "balance_before",
    "new_balance",
    "tokens_spent",
    "ledger_entry_id",
    "replayed",
}
# v1.1: a capture tells how far it went past its hold.
CAPTURE_KEYS = MOVEMENT_KEYS | {"overcaptured", "shortfall"}
FAILURE_KEYS = {"success", "error", "error_code"}


def rows(sql: str, **params: Any) -> list[dict[str, Any]]:
    with get_engine().connect() as conn:
        return [dict(r) for r in conn.execute(text(sql), params).mappings()]


def account(user_id: str) -> dict[str, Any] | None:
    found = rows("SELECT * FROM accounts WHERE user_id = :u", u=user_id)
    return found[0] if found else None


def balance(user_id: str) -> int:
    row = account(user_id)
    assert row is not None, f"no account {user_id!r}"
    return int(row["tokens_balance"])


def entries(user_id: str) -> list[dict[str, Any]]:
    """A user's ledger entries, oldest first."""
    return rows("SELECT * FROM ledger_entries WHERE user_id = :u ORDER BY id", u=user_id)


def snapshot() -> tuple[list[dict[str, Any]], ...]:
    """Everything a task could change."""
    return (
        rows("SELECT * FROM accounts ORDER BY user_id"),
        rows("SELECT * FROM ledger_entries ORDER BY id"),
        rows("SELECT * FROM idempotency_records ORDER BY user_id, key"),
    )


def execute(sql: str, **params: Any) -> None:
    with get_engine().begin() as conn:
        conn.execute(text(sql), params)


def backdate(entry_id: int | str, when: datetime) -> None:
    execute("UPDATE ledger_entries SET created_at = :t WHERE id = :i", t=when, i=int(entry_id))
