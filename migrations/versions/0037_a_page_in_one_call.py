"""A page of the ledger in one call: ``tokens_page``

``ledger.user_entries`` and ``ledger.entries_by_type`` read a page through one function that
finds whose ledger it is, reads the page and its splits, probes for a due grant and renders the
entries as JSON, with each statement's plan kept for the session (``plan_cache_mode`` set on the
function). Before, a page took two round trips, PostgreSQL planned the page's statement again
for every call (about a millisecond over the months' partitions) and the worker built each entry
and split from rows.

Revision ID: 0037
Revises: 0036
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0037"
down_revision: str | None = "0036"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    snapshot.apply("0037", "tokens_page")


def downgrade() -> None:
    op.execute("DROP FUNCTION tokens_page(text, text, timestamptz, timestamptz, integer, bigint)")
