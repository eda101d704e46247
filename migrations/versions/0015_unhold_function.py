"""tokens_unhold() and tokens_expire_holds(): ending a hold defined once, in SQL

A release freed its reservation's hold in tokens_release; the reservations' expiry freed the
holds of a chunk in Python (accounting/reservations.py), a second definition of the same rule.
``tokens_unhold`` (sql/holds/tokens_unhold.sql) frees the holds of any set of ended
reservations, their accounts locked in user order; ``tokens_release`` and the new
``tokens_expire_holds`` (a chunk of due reservations, oldest end first, SKIP LOCKED, expiry runs
taking turns on an advisory lock) both call it.

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0015"
down_revision: str | None = "0014"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    snapshot.apply("0015", "tokens_unhold", "tokens_release", "tokens_expire_holds")


def downgrade() -> None:
    snapshot.apply("0012", "tokens_release")
    op.execute("DROP FUNCTION IF EXISTS tokens_expire_holds(integer, timestamptz)")
    op.execute("DROP FUNCTION IF EXISTS tokens_unhold(text[], timestamptz)")
