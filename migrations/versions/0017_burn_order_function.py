"""tokens_burn_order(): the burn order defined once

The order grants are spent and held in was written out in tokens_free_grants, in
tokens_capture's loop over the grants a reservation holds, and in Python for the grants listing.
``tokens_burn_order`` (sql/grants/tokens_burn_order.sql) is the sort key all three order by:
priority, then the earliest end (a grant that never ends last), then creation, then id.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0017"
down_revision: str | None = "0016"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    snapshot.apply("0017", "tokens_burn_order", "tokens_free_grants", "tokens_capture")


def downgrade() -> None:
    snapshot.apply("0013", "tokens_free_grants")
    snapshot.apply("0009", "tokens_capture")
    op.execute(
        "DROP FUNCTION IF EXISTS tokens_burn_order(integer, timestamptz, timestamptz, bigint)"
    )
