"""grants (contract v1.1): where each token came from and when it ends; debt; holds of grants

Every existing balance becomes one ``adjustment`` grant per user (priority 50, no expiry) that
also backs what live reservations hold; what the balance lacks of that is debt. So for every
user, balance = sum of ledger = active grants' remaining - debt, before and after.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("accounts") as accounts:
        accounts.add_column(sa.Column("debt", sa.BigInteger(), server_default="0", nullable=False))
        accounts.create_check_constraint("debt_not_negative", "debt >= 0")
    with op.batch_alter_table("reservations") as reservations:
        reservations.add_column(
            sa.Column("overcapture_limit", sa.BigInteger(), server_default="0", nullable=False)
        )
        reservations.create_check_constraint("overcapture_not_negative", "overcapture_limit >= 0")

    op.create_index(
        "ix_accounts_in_debt",
        "accounts",
        ["user_id", "debt"],
        postgresql_where=sa.text("debt > 0"),
        sqlite_where=sa.text("debt > 0"),
    )
    op.create_table(
        "grants",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("user_id", sa.String(length=128), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("remaining", sa.BigInteger(), nullable=False),
        sa.Column("held", sa.BigInteger(), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.Column("expired", sa.BigInteger(), nullable=False),
        sa.Column("returned", sa.BigInteger(), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "kind IN ('allowance', 'rollover', 'purchased', 'promo', 'adjustment')",
            name=op.f("ck_grants_kind_known"),
        ),
        sa.CheckConstraint(
            "status IN ('active', 'depleted', 'expired')", name=op.f("ck_grants_status_known")
        ),
        sa.CheckConstraint("amount >= 0", name=op.f("ck_grants_amount_not_negative")),
        sa.CheckConstraint("remaining >= 0", name=op.f("ck_grants_remaining_not_negative")),
        sa.CheckConstraint(
            "held >= 0 AND held <= remaining", name=op.f("ck_grants_held_within_remaining")
        ),
        sa.CheckConstraint(
            "priority >= 0 AND priority <= 100", name=op.f("ck_grants_priority_range")
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["accounts.user_id"], name=op.f("fk_grants_user_id_accounts")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_grants")),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_grants_user_active",
        "grants",
        ["user_id", "priority", "expires_at", "created_at", "id"],
        postgresql_where=sa.text("status = 'active'"),
        sqlite_where=sa.text("status = 'active'"),
    )
    op.create_index(
        "ix_grants_active_expiry",
        "grants",
        ["expires_at", "user_id"],
        postgresql_where=sa.text("status = 'active' AND expires_at IS NOT NULL"),
        sqlite_where=sa.text("status = 'active' AND expires_at IS NOT NULL"),
    )
    op.create_index("ix_grants_user_created", "grants", ["user_id", "created_at"])
    op.create_table(
        "entry_grants",
        sa.Column("entry_id", sa.BigInteger(), nullable=False),
        sa.Column("grant_id", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["entry_id"],
            ["ledger_entries.id"],
            name=op.f("fk_entry_grants_entry_id_ledger_entries"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["grant_id"], ["grants.id"], name=op.f("fk_entry_grants_grant_id_grants")
        ),
        sa.PrimaryKeyConstraint("entry_id", "grant_id", name=op.f("pk_entry_grants")),
    )
    op.create_index("ix_entry_grants_grant", "entry_grants", ["grant_id"])
    op.create_table(
        "reservation_grants",
        sa.Column("reservation_id", sa.String(length=36), nullable=False),
        sa.Column("grant_id", sa.BigInteger(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount > 0", name=op.f("ck_reservation_grants_amount_positive")),
        sa.ForeignKeyConstraint(
            ["reservation_id"],
            ["reservations.id"],
            name=op.f("fk_reservation_grants_reservation_id_reservations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["grant_id"], ["grants.id"], name=op.f("fk_reservation_grants_grant_id_grants")
        ),
        sa.PrimaryKeyConstraint("reservation_id", "grant_id", name=op.f("pk_reservation_grants")),
    )

    # The conversion, set-based. One grant per user backs both the balance and what live
    # reservations hold (v1 allowed an overdraft under a hold, so the hold may exceed the
    # balance); the balance is that grant less the debt.
    bigger = "GREATEST" if op.get_context().dialect.name == "postgresql" else "MAX"
    op.execute(
        f"""
        INSERT INTO grants (user_id, kind, amount, remaining, held, spent, expired, returned,
                            priority, expires_at, status, created_at, ended_at)
        SELECT user_id, 'adjustment', {bigger}(tokens_balance, tokens_reserved),
               {bigger}(tokens_balance, tokens_reserved), tokens_reserved, 0, 0, 0,
               50, NULL, 'active', updated_at, NULL
        FROM accounts
        WHERE {bigger}(tokens_balance, tokens_reserved) > 0
        ORDER BY user_id
        """
    )
    op.execute(
        f"""
        UPDATE accounts SET debt = {bigger}(tokens_balance, tokens_reserved, 0) - tokens_balance
        WHERE tokens_balance < tokens_reserved OR tokens_balance < 0
        """
    )
    op.execute(
        """
        INSERT INTO reservation_grants (reservation_id, grant_id, amount)
        SELECT r.id, g.id, r.amount
        FROM reservations r JOIN grants g ON g.user_id = r.user_id
        WHERE r.status = 'active'
        """
    )


def downgrade() -> None:
    op.drop_table("reservation_grants")
    op.drop_index("ix_entry_grants_grant", table_name="entry_grants")
    op.drop_table("entry_grants")
    op.drop_index("ix_grants_user_created", table_name="grants")
    op.drop_index("ix_grants_active_expiry", table_name="grants")
    op.drop_index("ix_grants_user_active", table_name="grants")
    op.drop_table("grants")
    op.drop_index("ix_accounts_in_debt", table_name="accounts")
    with op.batch_alter_table("reservations") as reservations:
        reservations.drop_constraint("overcapture_not_negative", type_="check")
        reservations.drop_column("overcapture_limit")
    with op.batch_alter_table("accounts") as accounts:
        accounts.drop_constraint("debt_not_negative", type_="check")
        accounts.drop_column("debt")
