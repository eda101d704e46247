"""tokens_lock() over tokens_expire_due(), and tokens_prune(): the due-grant expiry and the
prune each defined once, in SQL

``tokens_lock`` carried its own copy of ``tokens_expire_due``'s loop (the due grants, by
(expires_at, id), one expiry entry each); it now calls it. The prune, a statement held in a
Python string (accounting/ledger.py), is ``tokens_prune`` (sql/ledger/tokens_prune.sql): a page
of users locked in user id order, then their entries before the cut-off folded into one
``carried_forward`` entry with its split, in a statement of its own after the lock.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    snapshot.apply("0014", "tokens_lock", "tokens_prune")


def downgrade() -> None:
    snapshot.apply("0012", "tokens_lock")
    op.execute("DROP FUNCTION IF EXISTS tokens_prune(text, integer, timestamptz, text)")
