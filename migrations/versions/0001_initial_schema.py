"""ledger, accounts, idempotency and reservations

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:

    op.create_table(
        "accounts",
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("tier", sa.String(length=64), nullable=False),
        sa.Column("tokens_balance", sa.BigInteger(), nullable=False),
        sa.Column("tokens_reserved", sa.BigInteger(), nullable=False),
        sa.Column("tokens_spent", sa.BigInteger(), nullable=False),
        sa.Column("last_renewal_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("subscription_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("tokens_reserved >= 0", name=op.f("ck_accounts_reserved_not_negative")),
        sa.CheckConstraint("tokens_spent >= 0", name=op.f("ck_accounts_spent_not_negative")),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_accounts")),
    )
    op.create_index(
        "ix_accounts_tier_last_renewal",
        "accounts",
        ["tier", "last_renewal_at", "user_id"],
        unique=False,
    )
    op.create_table(
        "idempotency_records",
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column(
            "response",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=True,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "key", name=op.f("pk_idempotency_records")),
    )
    op.create_table(
        "ledger_entries",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("operation_type", sa.String(length=64), nullable=False),
        sa.Column("tokens_amount", sa.BigInteger(), nullable=False),
        sa.Column("balance_before", sa.BigInteger(), nullable=False),
        sa.Column("balance_after", sa.BigInteger(), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("original_entry_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "metadata",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "balance_after = balance_before + tokens_amount",
            name=op.f("ck_ledger_entries_arithmetic"),
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["accounts.user_id"], name=op.f("fk_ledger_entries_user_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ledger_entries")),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_ledger_entries_created", "ledger_entries", ["created_at"], unique=False)
    op.create_index(
        "ix_ledger_entries_original",
        "ledger_entries",
        ["original_entry_id"],
        unique=False,
        postgresql_where=sa.text("original_entry_id IS NOT NULL"),
        sqlite_where=sa.text("original_entry_id IS NOT NULL"),
    )
    op.create_index(
        "ix_ledger_entries_type_created",
        "ledger_entries",
        ["operation_type", "created_at", "id"],
        unique=False,
    )
    op.create_index(
        "ix_ledger_entries_user_created",
        "ledger_entries",
        ["user_id", "created_at", "id"],
        unique=False,
    )
    op.create_table(
        "reservations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("operation_type", sa.String(length=64), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("settled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("captured_amount", sa.BigInteger(), nullable=True),
        sa.Column("ledger_entry_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "metadata",
            sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('active', 'captured', 'released', 'expired')",
            name=op.f("ck_reservations_status_known"),
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_reservations_amount_positive")),
        sa.ForeignKeyConstraint(
            ["user_id"], ["accounts.user_id"], name=op.f("fk_reservations_user_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reservations")),
    )
    op.create_index(
        "ix_reservations_active_expiry",
        "reservations",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )
    op.create_index("ix_reservations_user", "reservations", ["user_id"], unique=False)


def downgrade() -> None:

    op.drop_index("ix_reservations_user", table_name="reservations")
    op.drop_index(
        "ix_reservations_active_expiry",
        table_name="reservations",
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )
    op.drop_table("reservations")
    op.drop_index("ix_ledger_entries_user_created", table_name="ledger_entries")
    op.drop_index("ix_ledger_entries_type_created", table_name="ledger_entries")
    op.drop_index(
        "ix_ledger_entries_original",
        table_name="ledger_entries",
        postgresql_where=sa.text("original_entry_id IS NOT NULL"),
        sqlite_where=sa.text("original_entry_id IS NOT NULL"),
    )
    op.drop_index("ix_ledger_entries_created", table_name="ledger_entries")
    op.drop_table("ledger_entries")
    op.drop_table("idempotency_records")
    op.drop_index("ix_accounts_tier_last_renewal", table_name="accounts")
    op.drop_table("accounts")
