"""A page's splits read from their key alone

The key of ``entry_grants`` carries each split's ``amount`` and ``seq`` (``INCLUDE``), so the
history page reads an entry's splits from the key's index without visiting the table: at 50
million rows a page of 50 entries fetched 50 index pages and 50 table pages in as many places
for them, and the table's pages are the ones the machine's cache misses. No index is added:
every split already writes the key.

The key is built again on every month (ACCESS EXCLUSIVE on ``entry_grants`` while it builds:
about 25 s at 50 million splits here); run it with the workers stopped, as every migration.

Revision ID: 0038
Revises: 0037
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0038"
down_revision: str | None = "0037"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _key(include: str) -> None:
    op.execute(
        "ALTER TABLE entry_grants DROP CONSTRAINT pk_entry_grants,"
        " ADD CONSTRAINT pk_entry_grants PRIMARY KEY (entry_id, grant_id, created_at)" + include
    )


def upgrade() -> None:
    op.execute("SET LOCAL maintenance_work_mem = '256MB'")
    _key(" INCLUDE (amount, seq)")


def downgrade() -> None:
    _key("")
