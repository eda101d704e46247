"""tokens_set_alerts() refuses a pool's member (contract v1.2: set_alerts and set_auto_topup on a
member are MEMBER_ACCOUNT): it answers status 'member' and the pool, a new OUT column, so the
function is made again.

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0029"
down_revision: str | None = "0028"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIGNATURE = "tokens_set_alerts(text, bigint[], boolean, bigint, bigint, integer)"


def upgrade() -> None:
    op.execute(f"DROP FUNCTION {SIGNATURE}")
    snapshot.apply("0029", "tokens_set_alerts")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {SIGNATURE}")
    snapshot.apply("0020", "tokens_set_alerts")
