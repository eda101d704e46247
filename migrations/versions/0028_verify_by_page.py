"""ledger.verify a page of users per statement, and the canonical form without a call per value

``tokens_verify`` took one user (or everyone): the whole ledger was checked one user per call,
and a SQL function is planned at every call, so planning cost ten times the hashing. It takes a
page of users now. ``tokens_canonical`` writes the scalars of an object or array in place
instead of calling itself for each, and ``tokens_entry_hash`` skips it for empty metadata.

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0028"
down_revision: str | None = "0027"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DROP FUNCTION tokens_verify(text, integer)")
    snapshot.apply("0028", "tokens_canonical", "tokens_entry_hash", "tokens_verify")


def downgrade() -> None:
    op.execute("DROP FUNCTION tokens_verify(text[], integer)")
    snapshot.apply("0023", "tokens_canonical", "tokens_entry_hash", "tokens_verify")
