"""ledger.verify without JIT

``tokens_verify`` is planned for a page of users it cannot see, so the planner guesses a cost
past ``jit_above_cost`` and compiled the page's 77 functions: about 30 ms a statement, whatever
the page held (a page of one user with 100 entries took 35 ms, 2 ms without). The function sets
``jit = off`` for itself.

Revision ID: 0035
Revises: 0034
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from migrations import snapshot

revision: str = "0035"
down_revision: str | None = "0034"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    snapshot.apply("0035", "tokens_verify")


def downgrade() -> None:
    snapshot.apply("0032", "tokens_verify")
