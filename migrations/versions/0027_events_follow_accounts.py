"""Events belong to their account: a foreign key, so removing an account (or truncating the
accounts, CASCADE) removes its events with the seq counter they were numbered from; a new
account of the same id starts at seq 1 without meeting the old ones.

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0027"
down_revision: str | None = "0026"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_events_user_id_accounts"


def upgrade() -> None:
    # Events whose account is gone already (none unless accounts were removed by hand).
    op.execute(
        "DELETE FROM events e"
        " WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.user_id = e.user_id)"
    )
    op.create_foreign_key(FK, "events", "accounts", ["user_id"], ["user_id"], ondelete="CASCADE")


def downgrade() -> None:
    op.drop_constraint(FK, "events", type_="foreignkey")
