"""One definition of a due grant: ``tokens_grant_due``

A grant is due to expire when it is active, past its end and holds tokens no reservation holds.
That predicate was written four times: in ``tokens_expire_due`` (which expires it), in
``tokens_page``'s probe, in the expiry sweep's chunk and in the worker's check before a read. All
four now ask ``tokens_grant_due``, a single SQL expression the planner inlines, so each query
keeps its index.

Revision ID: 0039
Revises: 0038
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0039"
down_revision: str | None = "0038"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    snapshot.apply("0039", "tokens_grant_due", "tokens_expire_due", "tokens_page")


def downgrade() -> None:
    snapshot.apply("0009", "tokens_expire_due")
    snapshot.apply("0037", "tokens_page")
    op.execute("DROP FUNCTION tokens_grant_due(grants, timestamptz)")
