"""tokens_spend(): a debit or charge on PostgreSQL in one statement and one round trip

The function does what accounting/movements.py ``_spend`` does through accounting/grants.py
(which stays the reference, and the code SQLite runs): claim the idempotency key (replay or
conflict when it exists), lock the account, expire the user's due grants (one ``expiry`` entry
each), check the available tokens, burn the grants in burn order, move the account, write the
ledger entry with its split, and store the outcome under the key.

A refusal (``status`` other than ``ok`` or ``replay``) returns instead of raising, leaving what
it did (the claim, expiries) in the caller's transaction, which rolls back as it does today.

Correctness under READ COMMITTED: the function is VOLATILE plpgsql, so each statement in it takes
a fresh snapshot; the grants are read only after the account row lock is granted, so they are
never older than the last movement that held that lock.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        snapshot.apply("0005", "tokens_spend")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION IF EXISTS tokens_spend("
            "text, text, text, text, text, bigint, boolean, jsonb)"
        )
