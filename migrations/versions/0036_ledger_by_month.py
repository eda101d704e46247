"""The ledger partitioned by month (contract v1.2 "a ledger that grows for years")

``ledger_entries`` and ``entry_grants`` become tables partitioned by ``created_at`` (a split
takes its entry's ``created_at``), one partition per UTC month, so a prune drops whole months
(``tokens_prune_months``) and reads of a month touch one. Nothing is copied: each existing table
becomes the partition ``*_before``, holding everything before the first month (MINVALUE up to
the start of next month, so no existing entry falls outside it), after one validated CHECK
lets the attach skip its scan; ``*_after`` holds everything past the months made (to MAXVALUE:
no default partition, so the ranges cover every instant in order). The months from there to
three months ahead are made here; the worker and beat make the next ones
(``tokens_ledger_months``).

A key of a partitioned table holds its partition column: the ledger's is (id, created_at), and
splits and refund caps refer to (entry_id, created_at). Existing splits get their entry's date in
bounded batches (``BATCH`` entry ids a transaction), before the tables change; run it with the
workers stopped, as every migration. The worker's role keeps SELECT and INSERT on both parents
and gets no right on any partition.

Revision ID: 0036
Revises: 0035
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations import snapshot

revision: str = "0036"
down_revision: str | None = "0035"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "tokens_worker"
BATCH = 100_000
MONTHS_AHEAD = 3
MADE = (
    "tokens_carry(text[], timestamp with time zone, text, timestamp with time zone)",
    "tokens_ledger_partitions()",
    "tokens_ledger_partition(text, text)",
    "tokens_ledger_months(timestamp with time zone)",
    "tokens_prune_months(timestamp with time zone, text)",
)

LEDGER = """
CREATE TABLE ledger_entries (
    id bigint NOT NULL DEFAULT nextval('ledger_entries_id_seq'),
    user_id varchar(128) NOT NULL,
    kind varchar(32) NOT NULL,
    operation_type varchar(64) NOT NULL,
    tokens_amount bigint NOT NULL,
    balance_before bigint NOT NULL,
    balance_after bigint NOT NULL,
    idempotency_key varchar(255),
    original_entry_id bigint,
    metadata jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    spent_by varchar(128),
    prev_hash varchar(64) NOT NULL,
    hash varchar(64) NOT NULL,
    CONSTRAINT pk_ledger_entries PRIMARY KEY (id, created_at),
    CONSTRAINT ck_ledger_entries_arithmetic CHECK (balance_after = balance_before + tokens_amount),
    CONSTRAINT fk_ledger_entries_user_id_accounts FOREIGN KEY (user_id)
        REFERENCES accounts (user_id)
) PARTITION BY RANGE (created_at)
"""
LEDGER_INDEXES = {
    "ix_ledger_entries_spent_by": "(spent_by, created_at, id) WHERE spent_by IS NOT NULL",
    "ix_ledger_entries_user_created": "(user_id, created_at, id)",
    "ix_ledger_entries_type_created": "(operation_type, created_at, id)",
    "ix_ledger_entries_created": "(created_at, id)",
    "ix_ledger_entries_original": "(original_entry_id) WHERE original_entry_id IS NOT NULL",
}
SPLITS = """
CREATE TABLE entry_grants (
    entry_id bigint NOT NULL,
    grant_id bigint NOT NULL,
    amount bigint NOT NULL,
    seq integer NOT NULL,
    created_at timestamptz NOT NULL,
    CONSTRAINT pk_entry_grants PRIMARY KEY (entry_id, grant_id, created_at),
    CONSTRAINT fk_entry_grants_entry_id_ledger_entries FOREIGN KEY (entry_id, created_at)
        REFERENCES ledger_entries (id, created_at) ON DELETE CASCADE ON UPDATE CASCADE,
    CONSTRAINT fk_entry_grants_grant_id_grants FOREIGN KEY (grant_id) REFERENCES grants (id)
) PARTITION BY RANGE (created_at)
"""
SPLIT_INDEXES = {"ix_entry_grants_grant": "(grant_id)"}
# The first instant of the month after the newest of now and every entry: the old table holds
# everything before it.
BOUND = """
SELECT (date_trunc('month', greatest(now(), max(created_at)) AT TIME ZONE 'UTC')
        + interval '1 month') AT TIME ZONE 'UTC'
FROM ledger_entries
"""


def upgrade() -> None:
    bind = op.get_bind()
    op.add_column("entry_grants", sa.Column("created_at", sa.DateTime(timezone=True)))
    op.add_column("refund_totals", sa.Column("entry_created_at", sa.DateTime(timezone=True)))
    with op.get_context().autocommit_block():
        low, high = bind.execute(
            sa.text("SELECT min(entry_id), max(entry_id) FROM entry_grants")
        ).one()
        for start in range(low or 0, (high or -1) + 1, BATCH):
            bind.execute(
                sa.text(
                    "UPDATE entry_grants g SET created_at = e.created_at FROM ledger_entries e"
                    " WHERE e.id = g.entry_id AND g.entry_id >= :low AND g.entry_id < :high"
                ),
                {"low": start, "high": start + BATCH},
            )
    op.execute(
        "UPDATE refund_totals t SET entry_created_at = e.created_at FROM ledger_entries e"
        " WHERE e.id = t.entry_id"
    )
    op.alter_column("entry_grants", "created_at", nullable=False)
    op.alter_column("refund_totals", "entry_created_at", nullable=False)
    bound = bind.execute(sa.text(BOUND)).scalar_one().isoformat()

    op.execute("DROP TRIGGER tokens_chain ON ledger_entries")
    op.execute("DROP TRIGGER tokens_entry_event ON ledger_entries")
    # Made again with id after created_at: the splits' key check (now on (id, created_at)) is
    # planned on it, and entries stamped at one instant (a batch) would each scan all the others.
    op.drop_index("ix_ledger_entries_created", "ledger_entries")
    op.drop_constraint("fk_entry_grants_entry_id_ledger_entries", "entry_grants")
    op.drop_constraint("fk_refund_totals_entry_id_ledger_entries", "refund_totals")
    _partition("ledger_entries", LEDGER, LEDGER_INDEXES, bound)
    op.execute("ALTER SEQUENCE ledger_entries_id_seq OWNED BY ledger_entries.id")
    # The hash takes an entry of the ledger's row type, which stayed with the old table.
    snapshot.apply("0036", "tokens_entry_hash")
    op.execute("DROP FUNCTION tokens_entry_hash(text, ledger_entries_before, text)")
    op.execute("ALTER TABLE ledger_entries_before ALTER COLUMN id DROP DEFAULT")
    _partition("entry_grants", SPLITS, SPLIT_INDEXES, bound)
    # Everything past the months made (tokens_ledger_months makes months out of its front).
    snapshot.apply("0036", "tokens_ledger_partition")
    op.execute(f"SELECT tokens_ledger_partition('after', 'FROM (''{bound}'') TO (MAXVALUE)')")
    op.create_foreign_key(
        "fk_refund_totals_entry_id_ledger_entries",
        "refund_totals",
        "ledger_entries",
        ["entry_id", "entry_created_at"],
        ["id", "created_at"],
        ondelete="CASCADE",
        onupdate="CASCADE",
    )
    op.create_index("ix_refund_totals_entry_created_at", "refund_totals", ["entry_created_at"])
    _triggers_and_rights()
    op.execute(f"REVOKE ALL ON ledger_entries_before, entry_grants_before FROM {ROLE}")
    snapshot.apply(
        "0036",
        "tokens_ledger_partitions",
        "tokens_ledger_months",
        "tokens_carry",
        "tokens_prune",
        "tokens_prune_months",
        "tokens_write",
        "tokens_refund",
    )
    op.execute(f"SELECT tokens_ledger_months(now() + interval '{MONTHS_AHEAD} months')")


def _partition(table: str, create: str, indexes: dict[str, str], bound: str) -> None:
    """Make ``table`` a table partitioned by created_at whose first partition is the old table,
    renamed ``<table>_before``; its indexes become the partition's part of the parent's."""
    before = f"{table}_before"
    op.execute(f"ALTER TABLE {table} RENAME TO {before}")
    # Its key becomes the parent's (with created_at), built as the partition is attached.
    op.execute(f"ALTER TABLE {before} DROP CONSTRAINT pk_{table}")
    for name in indexes:
        op.execute(f"ALTER INDEX IF EXISTS {name} RENAME TO {name.replace(table, before)}")
    op.execute(create)
    op.execute(
        f"ALTER TABLE {before} ADD CONSTRAINT {before}_bound CHECK (created_at < '{bound}')"
        " NOT VALID"
    )
    op.execute(f"ALTER TABLE {before} VALIDATE CONSTRAINT {before}_bound")
    op.execute(
        f"ALTER TABLE {table} ATTACH PARTITION {before} FOR VALUES FROM (MINVALUE) TO ('{bound}')"
    )
    op.execute(f"ALTER TABLE {before} DROP CONSTRAINT {before}_bound")
    for name, columns in indexes.items():
        # Finds the old table's matching index and attaches it (nothing is built).
        op.execute(f"CREATE INDEX {name} ON {table} {columns}")


def downgrade() -> None:
    """Back to plain tables, the rows copied (the months dropped with the parents)."""
    op.execute("DROP TRIGGER tokens_chain ON ledger_entries")
    op.execute("DROP TRIGGER tokens_entry_event ON ledger_entries")
    op.drop_constraint("fk_refund_totals_entry_id_ledger_entries", "refund_totals")
    op.drop_index("ix_refund_totals_entry_created_at", "refund_totals")
    for signature in MADE:
        op.execute(f"DROP FUNCTION {signature}")
    snapshot.apply("0026", "tokens_prune")
    snapshot.apply("0021", "tokens_write")
    snapshot.apply("0026", "tokens_refund")
    for table in ("ledger_entries", "entry_grants"):
        op.execute(f"CREATE TABLE {table}_plain (LIKE {table} INCLUDING DEFAULTS)")
        op.execute(f"INSERT INTO {table}_plain SELECT * FROM {table}")
    op.execute("ALTER SEQUENCE ledger_entries_id_seq OWNED BY ledger_entries_plain.id")
    op.execute("DROP TABLE entry_grants")
    op.execute("DROP FUNCTION tokens_entry_hash(text, ledger_entries, text)")
    op.execute("DROP TABLE ledger_entries")
    before_0036 = {**LEDGER_INDEXES, "ix_ledger_entries_created": "(created_at)"}
    for table, indexes in (("ledger_entries", before_0036), ("entry_grants", SPLIT_INDEXES)):
        op.execute(f"ALTER TABLE {table}_plain RENAME TO {table}")
        for name, columns in indexes.items():
            op.execute(f"CREATE INDEX {name} ON {table} {columns}")
    op.create_primary_key("pk_ledger_entries", "ledger_entries", ["id"])
    # Raw, not op.create_check_constraint: the models' naming convention would prefix it again.
    op.execute(
        "ALTER TABLE ledger_entries ADD CONSTRAINT ck_ledger_entries_arithmetic"
        " CHECK (balance_after = balance_before + tokens_amount)"
    )
    op.create_foreign_key(
        "fk_ledger_entries_user_id_accounts", "ledger_entries", "accounts", ["user_id"], ["user_id"]
    )
    snapshot.apply("0032", "tokens_entry_hash")
    op.drop_column("entry_grants", "created_at")
    op.create_primary_key("pk_entry_grants", "entry_grants", ["entry_id", "grant_id"])
    op.create_foreign_key(
        "fk_entry_grants_entry_id_ledger_entries",
        "entry_grants",
        "ledger_entries",
        ["entry_id"],
        ["id"],
        ondelete="CASCADE",
    )
    op.create_foreign_key(
        "fk_entry_grants_grant_id_grants", "entry_grants", "grants", ["grant_id"], ["id"]
    )
    op.drop_column("refund_totals", "entry_created_at")
    op.create_foreign_key(
        "fk_refund_totals_entry_id_ledger_entries",
        "refund_totals",
        "ledger_entries",
        ["entry_id"],
        ["id"],
        ondelete="CASCADE",
    )
    _triggers_and_rights()


def _triggers_and_rights() -> None:
    """The ledger's two triggers, and the worker's role reading and appending only (0023,
    0020, 0026), on a ledger_entries made anew."""
    op.execute(
        "CREATE TRIGGER tokens_chain BEFORE INSERT ON ledger_entries"
        " FOR EACH ROW EXECUTE FUNCTION tokens_chain()"
    )
    op.execute(
        "CREATE TRIGGER tokens_entry_event AFTER INSERT ON ledger_entries"
        " FOR EACH ROW EXECUTE FUNCTION tokens_entry_event()"
    )
    op.execute(f"GRANT SELECT, INSERT ON ledger_entries, entry_grants TO {ROLE}")
    op.execute(f"REVOKE UPDATE, DELETE, TRUNCATE ON ledger_entries, entry_grants FROM {ROLE}")
