"""renewal sweeps fan out: each sweep's plan and each chunk's tally

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "sweeps",
        sa.Column("sweep_id", sa.String(length=255), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tiers", JSON, nullable=False),
        sa.Column("continue_on_error", sa.Boolean(), nullable=False),
        sa.Column("chunks", sa.Integer(), nullable=False),
        sa.Column("stopped", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sweep_id", name=op.f("pk_sweeps")),
    )
    op.create_index("ix_sweeps_created", "sweeps", ["created_at"], unique=False)
    op.create_table(
        "sweep_chunks",
        sa.Column("sweep_id", sa.String(length=255), nullable=False),
        sa.Column("chunk_index", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(length=16), nullable=False),
        sa.Column("after_user", sa.String(length=128), nullable=False),
        sa.Column("after_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("upto_user", sa.String(length=128), nullable=False),
        sa.Column("upto_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("planned", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("successful", sa.Integer(), nullable=False),
        sa.Column("skipped", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("errors", JSON, nullable=False),
        sa.Column("contested", JSON, nullable=True),
        sa.CheckConstraint(
            "status IN ('planned', 'contested', 'done', 'stopped')",
            name=op.f("ck_sweep_chunks_status_known"),
        ),
        sa.CheckConstraint(
            "phase IN ('never', 'lapsed')", name=op.f("ck_sweep_chunks_phase_known")
        ),
        sa.ForeignKeyConstraint(
            ["sweep_id"],
            ["sweeps.sweep_id"],
            name=op.f("fk_sweep_chunks_sweep_id_sweeps"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("sweep_id", "chunk_index", name=op.f("pk_sweep_chunks")),
    )


def downgrade() -> None:
    op.drop_table("sweep_chunks")
    op.drop_index("ix_sweeps_created", table_name="sweeps")
    op.drop_table("sweeps")
