"""ledger.verify writes a page's metadata in one sort, not a sort per entry

``tokens_verify`` spent most of its time in ``tokens_canonical``: a PL/pgSQL call per entry
whose query (an object's members sorted and joined) set up and tore down a sort each time. The
canonical form of objects is now ``tokens_canonical_objects``, which writes many at once with
one sort of all their members, each value by ``tokens_canonical_value`` (an expression the
planner inlines); ``tokens_canonical`` writes an object through it. ``tokens_entry_hash`` takes
the metadata's canonical text from its caller: verify writes a page's with one call, the
chain's trigger and the backfill one entry's. Hashes do not change.

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0032"
down_revision: str | None = "0031"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # PL/pgSQL first (its body is resolved when it runs), then the SQL functions, which are
    # checked against what exists when they are made.
    snapshot.apply(
        "0032",
        "tokens_canonical",
        "tokens_canonical_value",
        "tokens_canonical_objects",
        "tokens_entry_hash",
        "tokens_chain",
        "tokens_chain_backfill",
        "tokens_verify",
    )
    op.execute("DROP FUNCTION tokens_entry_hash(text, ledger_entries)")


def downgrade() -> None:
    snapshot.apply("0028", "tokens_canonical", "tokens_entry_hash", "tokens_verify")
    snapshot.apply("0023", "tokens_chain", "tokens_chain_backfill")
    op.execute("DROP FUNCTION tokens_entry_hash(text, ledger_entries, text)")
    op.execute("DROP FUNCTION tokens_canonical_objects(jsonb[])")
    op.execute("DROP FUNCTION tokens_canonical_value(jsonb)")
