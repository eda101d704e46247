"""Pools (contract v1.2): members spend their pool's grants through the same functions

``accounts`` gains ``parent_id`` and ``pool_id`` (fixed when a member is opened), ``limited``
(on a pool: some account of its tree has a spend limit) and ``subtree_held`` (on a member: what
the reservations it and the accounts below it made hold); ledger entries and reservations gain
``spent_by`` (the member; ``user_id`` is the pool). The spend limits' tables arrive empty with
it: ``spend_limits`` and ``limit_buckets``.

``tokens_lock`` locks the pool of the account it is given and says which pool it is;
``tokens_write`` writes a member's movement in its pool's ledger; every movement function goes
through them, and through ``tokens_limit``, the one home of what a movement counts against
spend limits (here: the members' holds).

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations import snapshot

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Functions whose arguments or results change: dropped, then made again from the snapshot (the
# callers, PL/pgSQL, resolve them when they run). Those whose arguments stay keep their name.
SAME_ARGUMENTS = (
    "tokens_lock(text)",
    "tokens_spend(text, text, text, text, text, bigint, boolean, jsonb)",
    "tokens_spend_many(text[], text[], text[], text[], bigint[], boolean[], jsonb[])",
    "tokens_credit(text, text, text, text, text, bigint, integer, timestamptz, jsonb)",
    "tokens_reset(text, text, text, text, bigint, integer, jsonb)",
    "tokens_refund(text, text, text, bigint, bigint, jsonb)",
    "tokens_reserve(text, text, text, text, bigint, text, integer, jsonb, bigint)",
    "tokens_extend(text, text, text, bigint, integer)",
)
WRITE = (
    "tokens_write(text, text, text, bigint, bigint, bigint, text, jsonb, timestamptz,"
    " bigint[], bigint[], bigint, bigint"
)
CHANGED = (
    *SAME_ARGUMENTS,
    WRITE + ")",
    "tokens_open(text, text, bigint, timestamptz, timestamptz)",
)
MADE = (
    *SAME_ARGUMENTS,
    WRITE + ", text)",
    "tokens_open(text, text, bigint, timestamptz, timestamptz, text)",
    "tokens_limit(text, text, boolean, bigint, timestamptz, bigint, timestamptz, boolean)",
)
APPLIED = (
    "tokens_limit",
    "tokens_lock",
    "tokens_write",
    "tokens_open",
    "tokens_spend",
    "tokens_spend_many",
    "tokens_credit",
    "tokens_reset",
    "tokens_refund",
    "tokens_reserve",
    "tokens_extend",
    "tokens_release",
    "tokens_unhold",
    "tokens_capture",
)


def upgrade() -> None:
    op.add_column("accounts", sa.Column("parent_id", sa.String(128), nullable=True))
    op.create_foreign_key(
        "fk_accounts_parent_id_accounts", "accounts", "accounts", ["parent_id"], ["user_id"]
    )
    op.add_column("accounts", sa.Column("pool_id", sa.String(128), nullable=True))
    op.add_column(
        "accounts", sa.Column("limited", sa.Boolean(), server_default="false", nullable=False)
    )
    op.add_column(
        "accounts",
        sa.Column("subtree_held", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.create_check_constraint(
        "ck_accounts_subtree_held_not_negative", "accounts", "subtree_held >= 0"
    )
    op.create_index(
        "ix_accounts_pool", "accounts", ["pool_id"], postgresql_where=sa.text("pool_id IS NOT NULL")
    )
    op.add_column("ledger_entries", sa.Column("spent_by", sa.String(128), nullable=True))
    op.create_index(
        "ix_ledger_entries_spent_by",
        "ledger_entries",
        ["spent_by", "created_at", "id"],
        postgresql_where=sa.text("spent_by IS NOT NULL"),
    )
    op.add_column("reservations", sa.Column("spent_by", sa.String(128), nullable=True))
    op.create_table(
        "spend_limits",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("max_tokens", sa.BigInteger(), nullable=False),
        sa.Column("period", sa.String(8), nullable=False),
        sa.Column("rolling", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "name", name="pk_spend_limits"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["accounts.user_id"], name="fk_spend_limits_user_id_accounts"
        ),
        sa.CheckConstraint("max_tokens >= 0", name="ck_spend_limits_max_not_negative"),
        sa.CheckConstraint(
            "period IN ('minute', 'hour', 'day', 'week', 'month')",
            name="ck_spend_limits_period_known",
        ),
    )
    op.create_table(
        "limit_buckets",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("grain", sa.String(8), nullable=False),
        sa.Column("bucket", sa.DateTime(timezone=True), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("user_id", "grain", "bucket", name="pk_limit_buckets"),
    )
    for signature in CHANGED:
        op.execute(f"DROP FUNCTION {signature}")
    snapshot.apply("0021", *APPLIED)


def downgrade() -> None:
    for signature in MADE:
        op.execute(f"DROP FUNCTION {signature}")
    snapshot.apply("0014", "tokens_lock")
    snapshot.apply("0018", "tokens_write", "tokens_refund", "tokens_capture")
    snapshot.apply("0013", "tokens_open", "tokens_spend_many", "tokens_reserve", "tokens_extend")
    snapshot.apply("0011", "tokens_spend")
    snapshot.apply("0008", "tokens_credit", "tokens_reset")
    snapshot.apply("0015", "tokens_release", "tokens_unhold")
    op.drop_table("limit_buckets")
    op.drop_table("spend_limits")
    op.drop_column("reservations", "spent_by")
    op.drop_index("ix_ledger_entries_spent_by", table_name="ledger_entries")
    op.drop_column("ledger_entries", "spent_by")
    op.drop_index("ix_accounts_pool", table_name="accounts")
    op.drop_constraint("fk_accounts_parent_id_accounts", "accounts", type_="foreignkey")
    for column in ("subtree_held", "limited", "pool_id", "parent_id"):
        op.drop_column("accounts", column)
