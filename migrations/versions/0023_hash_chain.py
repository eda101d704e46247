"""A hash chain per user over the ledger (contract v1.2 "A verifiable ledger")

Each entry gets ``prev_hash`` and ``hash``, computed when it is inserted by a BEFORE INSERT
trigger (``tokens_chain``), whichever path writes it, under the account lock the writer holds.
Existing entries are chained here, a thousand users per transaction (``tokens_chain_backfill``),
before the trigger exists; run it with the workers stopped, as every migration. The prune's
carried_forward entry becomes its user's checkpoint. ``tokens_verify`` checks every chain.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from migrations import snapshot

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MADE = (
    "tokens_verify(text, integer)",
    "tokens_chain_backfill(text, integer)",
    "tokens_chain()",
    "tokens_entry_hash(text, ledger_entries)",
    "tokens_canonical(jsonb)",
    "tokens_canonical_number(text)",
)
BATCH_USERS = 1000


def upgrade() -> None:
    op.add_column("ledger_entries", sa.Column("prev_hash", sa.String(64), nullable=True))
    op.add_column("ledger_entries", sa.Column("hash", sa.String(64), nullable=True))
    snapshot.apply(
        "0023",
        "tokens_canonical_number",
        "tokens_canonical",
        "tokens_entry_hash",
        "tokens_chain",
        "tokens_chain_backfill",
        "tokens_verify",
        "tokens_prune",
    )
    # Bounded transactions: each batch commits, so ten million entries never sit in one.
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        after = None
        while True:
            after = bind.execute(
                sa.text("SELECT tokens_chain_backfill(:after, :n)"),
                {"after": after, "n": BATCH_USERS},
            ).scalar_one()
            if after is None:
                break
    op.alter_column("ledger_entries", "prev_hash", nullable=False)
    op.alter_column("ledger_entries", "hash", nullable=False)
    op.execute(
        "CREATE TRIGGER tokens_chain BEFORE INSERT ON ledger_entries"
        " FOR EACH ROW EXECUTE FUNCTION tokens_chain()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER tokens_chain ON ledger_entries")
    for signature in MADE:
        op.execute(f"DROP FUNCTION {signature}")
    snapshot.apply("0014", "tokens_prune")
    op.drop_column("ledger_entries", "hash")
    op.drop_column("ledger_entries", "prev_hash")
