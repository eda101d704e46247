"""limit.reached (contract v1.2 events): a movement that takes a spend limit's window to its
max_tokens writes the event for the account the limit is set on, once per window and limit

``tokens_limit`` decides it where it counts the movement (under the pool's lock) and writes it
through ``tokens_event``; ``spend_limits.reached_at`` keeps the window (its first bucket) it was
last written for.

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations import snapshot

revision: str = "0030"
down_revision: str | None = "0029"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("spend_limits", sa.Column("reached_at", sa.DateTime(timezone=True)))
    snapshot.apply("0030", "tokens_limit")


def downgrade() -> None:
    snapshot.apply("0024", "tokens_limit")
    op.drop_column("spend_limits", "reached_at")
