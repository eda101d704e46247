"""Balances as of any instant (contract v1.2 ``get_balance(as_of=...)``)

The ledger already says what the balance was after each entry; tokens_reserved and tokens_spent
change without one (a hold, a member's spend), so ``account_history`` keeps what they became at
each change, written by an AFTER UPDATE trigger on accounts (``tokens_history``) whichever path
changed them. ``tokens_balance_at`` reads the three, one index probe each. Accounts that already
hold reserved or spent tokens get one row at their last change: their history before this
revision is not known (an ``as_of`` before it reads what they held then as 0).

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations import snapshot

revision: str = "0025"
down_revision: str | None = "0024"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "account_history",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reserved", sa.BigInteger(), nullable=False),
        sa.Column("spent", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["accounts.user_id"],
            name="fk_account_history_user_id_accounts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_account_history"),
    )
    op.create_index("ix_account_history_user_at", "account_history", ["user_id", "at", "id"])
    snapshot.apply("0025", "tokens_history", "tokens_balance_at")
    op.execute(
        "INSERT INTO account_history (user_id, at, reserved, spent)"
        " SELECT user_id, updated_at, tokens_reserved, tokens_spent FROM accounts"
        " WHERE tokens_reserved <> 0 OR tokens_spent <> 0"
    )
    op.execute(
        "CREATE TRIGGER tokens_history AFTER UPDATE ON accounts FOR EACH ROW"
        " WHEN (OLD.tokens_reserved IS DISTINCT FROM NEW.tokens_reserved"
        " OR OLD.tokens_spent IS DISTINCT FROM NEW.tokens_spent)"
        " EXECUTE FUNCTION tokens_history()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER tokens_history ON accounts")
    op.execute("DROP FUNCTION tokens_balance_at(text, timestamptz)")
    op.execute("DROP FUNCTION tokens_history()")
    op.drop_table("account_history")
