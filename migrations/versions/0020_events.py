"""The events outbox (contract v1.2 "Events"): the events table, per-user seq on the account,
alerts and auto top-up, and the triggers that write the events in the change's transaction

- ``tokens_event`` is the one write of an event (the account's next ``events_seq``, the row);
- every ledger entry writes its ``balance.changed`` through an AFTER INSERT trigger
  (``tokens_entry_event``), whichever path inserted it;
- an account with alerts or an auto top-up (``accounts.watched``) has its crossings decided at
  the commit of each change of its balance or reserved tokens, by a deferred constraint trigger
  (``tokens_alerts_due`` over ``tokens_alerts``);
- ``tokens_set_alerts`` sets both; ``tokens_events_number`` gives committed events their place
  in the global order.

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from migrations import snapshot

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MADE = (
    "tokens_alerts_due()",
    "tokens_entry_event()",
    "tokens_alerts(text)",
    "tokens_event(text, text, jsonb, timestamptz, bigint)",
    "tokens_events_number(integer)",
    "tokens_set_alerts(text, bigint[], boolean, bigint, bigint, integer)",
)


def _at(name: str, nullable: bool = True) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.add_column(
        "accounts", sa.Column("events_seq", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.add_column(
        "accounts", sa.Column("watched", sa.Boolean(), server_default="false", nullable=False)
    )
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("type", sa.String(64), nullable=False),
        _at("at", nullable=False),
        sa.Column("data", postgresql.JSONB(), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), nullable=True),
        sa.Column("pos", sa.BigInteger(), nullable=True),
        _at("webhook_done_at"),
        _at("webhook_dead_at"),
        sa.Column("webhook_attempts", sa.Integer(), server_default="0", nullable=False),
        _at("webhook_next_at"),
        _at("webhook_failing_since"),
        sa.Column("webhook_error", sa.String(1000), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
    )
    op.create_index("ix_events_user_id_seq", "events", ["user_id", "seq"], unique=True)
    op.create_index(
        "ix_events_pos", "events", ["pos"], unique=True, postgresql_where=sa.text("pos IS NOT NULL")
    )
    op.create_index(
        "ix_events_unnumbered", "events", ["id"], postgresql_where=sa.text("pos IS NULL")
    )
    op.create_index(
        "ix_events_webhook_pending",
        "events",
        ["pos"],
        postgresql_where=sa.text(
            "pos IS NOT NULL AND webhook_done_at IS NULL AND webhook_dead_at IS NULL"
        ),
    )
    op.create_table(
        "event_positions",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_event_positions"),
    )
    op.execute("INSERT INTO event_positions (id, last) VALUES (1, 0)")
    op.create_table(
        "event_channels",
        sa.Column("name", sa.String(32), nullable=False),
        sa.Column("pos", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_event_channels"),
    )
    op.create_table(
        "event_alerts",
        sa.Column("user_id", sa.String(128), nullable=False),
        sa.Column(
            "thresholds", postgresql.ARRAY(sa.BigInteger()), server_default="{}", nullable=False
        ),
        sa.Column("available", sa.BigInteger(), nullable=False),
        sa.Column("topup_below", sa.BigInteger(), nullable=True),
        sa.Column("topup_amount", sa.BigInteger(), nullable=True),
        sa.Column("topup_max_per_month", sa.Integer(), nullable=True),
        sa.Column("topup_key", sa.String(64), nullable=True),
        _at("topup_requested_at"),
        _at("topup_month"),
        sa.Column("topup_count", sa.Integer(), server_default="0", nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["accounts.user_id"],
            name="fk_event_alerts_user_id_accounts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", name="pk_event_alerts"),
    )
    snapshot.apply(
        "0020",
        "tokens_event",
        "tokens_entry_event",
        "tokens_alerts",
        "tokens_alerts_due",
        "tokens_set_alerts",
        "tokens_events_number",
    )
    op.execute(
        "CREATE TRIGGER tokens_entry_event AFTER INSERT ON ledger_entries"
        " FOR EACH ROW EXECUTE FUNCTION tokens_entry_event()"
    )
    # Deferred: at the commit, once, whatever the transaction did to the account before.
    op.execute(
        "CREATE CONSTRAINT TRIGGER tokens_alerts_due"
        " AFTER UPDATE OF tokens_balance, tokens_reserved ON accounts"
        " DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN (NEW.watched)"
        " EXECUTE FUNCTION tokens_alerts_due()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER tokens_alerts_due ON accounts")
    op.execute("DROP TRIGGER tokens_entry_event ON ledger_entries")
    for signature in MADE:
        op.execute(f"DROP FUNCTION {signature}")
    op.drop_table("event_alerts")
    op.drop_table("event_channels")
    op.drop_table("event_positions")
    op.drop_table("events")
    op.drop_column("accounts", "watched")
    op.drop_column("accounts", "events_seq")
