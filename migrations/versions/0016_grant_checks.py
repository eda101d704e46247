"""The grant invariants the schema can state become CHECK constraints

``ledger.reconcile`` and the tests checked them after the fact; now the database refuses a write
that breaks one: a grant's own arithmetic (remaining = amount - spent - expired + returned), its
counters never negative, an active grant has tokens left and a depleted one none (an expired
grant keeps none either, but a refund puts tokens back into one and expires them again within
its statement, and a CHECK constraint cannot wait for the end of a statement's function).
Existing rows are checked as the constraints are added: a database whose grants break one will
not migrate until repaired.

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0016"
down_revision: str | None = "0015"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECKS = {
    "counters_not_negative": "spent >= 0 AND expired >= 0 AND returned >= 0",
    "arithmetic": "remaining = amount - spent - expired + returned",
    "active_has_tokens": "status <> 'active' OR remaining > 0",
    "depleted_has_none": "status <> 'depleted' OR remaining = 0",
}


def upgrade() -> None:
    for name, condition in CHECKS.items():
        op.create_check_constraint(name, "grants", condition)


def downgrade() -> None:
    for name in CHECKS:
        op.drop_constraint(op.f(f"ck_grants_{name}"), "grants", type_="check")
