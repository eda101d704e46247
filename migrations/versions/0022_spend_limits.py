"""Spend limits (contract v1.2): decided and counted inside each movement, under its pool's lock

``tokens_limit`` (0021's home of what a movement counts against limits) now decides and counts
them: each limit's window is a run of buckets (``tokens_bucket``, ``tokens_window``) in
``limit_buckets``, which every spend of the tree adds to and every refund of a spend takes
from, so no movement reads the ledger. ``tokens_limits`` lists the limits that apply to an
account with what each has used (the one test of a limit, also ``tokens.can_afford``'s through
``tokens_limit_refusing``); ``tokens_set_limit`` sets one under the pool's lock and builds its
buckets from the ledger.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MADE = (
    "tokens_limit_refusing(text, bigint)",
    "tokens_set_limit(text, text, bigint, text, boolean)",
    "tokens_limits(text, timestamptz, bigint)",
    "tokens_window(text, boolean, timestamptz)",
    "tokens_bucket(text, timestamptz)",
)


def upgrade() -> None:
    snapshot.apply(
        "0022",
        "tokens_bucket",
        "tokens_window",
        "tokens_limits",
        "tokens_limit",
        "tokens_limit_refusing",
        "tokens_set_limit",
    )


def downgrade() -> None:
    snapshot.apply("0021", "tokens_limit")
    for signature in MADE:
        op.execute(f"DROP FUNCTION {signature}")
