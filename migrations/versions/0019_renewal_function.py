"""tokens_renew(): a renewal through the functions every movement uses

The renewal sweep and ``renew_user`` ran one set-based statement of their own, with their own
copies of a new grant paying debt first, of the ledger write and of the due-grant expiry. Each
locked user now goes through ``tokens_renew``, which expires due grants (``tokens_lock``), grants
(``tokens_grant``) and writes its entries (``tokens_write``) as a movement does.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0019"
down_revision: str | None = "0018"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    snapshot.apply("0019", "tokens_renew")


def downgrade() -> None:
    op.execute(
        "DROP FUNCTION tokens_renew(text, text, bigint, timestamptz, boolean, boolean, bigint,"
        " timestamptz, integer, timestamptz, text)"
    )
