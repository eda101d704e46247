"""refund caps kept apart from the entries pruning may delete; idempotency retention index

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "refund_totals",
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("charged", sa.BigInteger(), nullable=False),
        sa.Column("refunded", sa.BigInteger(), nullable=False),
        sa.CheckConstraint(
            "refunded >= 0 AND refunded <= charged", name=op.f("ck_refund_totals_within_charge")
        ),
        sa.PrimaryKeyConstraint("entry_id", name=op.f("pk_refund_totals")),
    )
    # What the refund entries still in the ledger say; a refund pruned before this migration is
    # gone from both the sum and (with its debit) the cap.
    op.execute(
        """
        INSERT INTO refund_totals (entry_id, user_id, charged, refunded)
        SELECT o.id, o.user_id, -o.tokens_amount, SUM(r.tokens_amount)
        FROM ledger_entries r JOIN ledger_entries o ON o.id = r.original_entry_id
        WHERE r.kind = 'refund'
        GROUP BY o.id, o.user_id, o.tokens_amount
        """
    )
    op.create_index(
        "ix_idempotency_records_created", "idempotency_records", ["created_at"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_idempotency_records_created", table_name="idempotency_records")
    op.drop_table("refund_totals")
