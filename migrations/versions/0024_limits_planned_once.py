"""Spend limits at a member debit's pace: the windows inlined, the listing planned once

Measured by ``python -m bench.pool_debit`` and server-side loops: ``tokens_limits`` (a SQL
function) was planned at each call and called ``tokens_window`` and ``tokens_bucket`` without
inlining them (an integer-to-text concatenation and ``extract`` on a timestamptz are only
STABLE, so IMMUTABLE declarations kept the planner from inlining; a scalar subquery argument
did too), about 1.1 ms a call. Now ``tokens_bucket`` and ``tokens_window`` are STABLE single
SELECTs (``tokens_window`` returning a one-row table) that inline, ``tokens_limits`` is
PL/pgSQL (its plan kept per session) with its holds computed once, and ``tokens_limit`` counts
every bucket of a spend in one upsert: about 0.3 ms for six limits. Same results.

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0024"
down_revision: str | None = "0023"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WINDOW = "tokens_window(text, boolean, timestamptz)"
LIMITS = "tokens_limits(text, timestamptz, bigint)"


def upgrade() -> None:
    # Other results (a table), another language: dropped and made again.
    op.execute(f"DROP FUNCTION {LIMITS}")
    op.execute(f"DROP FUNCTION {WINDOW}")
    snapshot.apply("0024", "tokens_bucket", "tokens_window", "tokens_limits", "tokens_limit")


def downgrade() -> None:
    op.execute(f"DROP FUNCTION {LIMITS}")
    op.execute(f"DROP FUNCTION {WINDOW}")
    snapshot.apply("0022", "tokens_bucket", "tokens_window", "tokens_limits", "tokens_limit")
