"""tokens_write(): one write of a movement, for the refund, the capture and a grant's expiry too

``tokens_refund``, ``tokens_capture`` and ``tokens_expire_grant`` each wrote the account, the
ledger entry and its split themselves, beside ``tokens_write``, which the other movements use.
``tokens_write`` now also takes the entry's original (a refund) and a change of the reserved
tokens (a capture ends its hold), both defaulted, so the three go through it.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0018"
down_revision: str | None = "0017"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD = (
    "tokens_write(text, text, text, bigint, bigint, bigint, text, jsonb, timestamptz,"
    " bigint[], bigint[])"
)
NEW = (
    "tokens_write(text, text, text, bigint, bigint, bigint, text, jsonb, timestamptz,"
    " bigint[], bigint[], bigint, bigint)"
)


def upgrade() -> None:
    # A new signature: dropped and made again (the callers, PL/pgSQL, resolve it when they run).
    op.execute(f"DROP FUNCTION {OLD}")
    snapshot.apply("0018", "tokens_write", "tokens_refund", "tokens_capture", "tokens_expire_grant")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {NEW}")
    snapshot.apply("0008", "tokens_write")
    snapshot.apply("0012", "tokens_refund")
    snapshot.apply("0017", "tokens_capture")
    snapshot.apply("0007", "tokens_expire_grant")
