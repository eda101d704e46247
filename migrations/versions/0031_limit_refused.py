"""limit.reached for a request a limit refused (contract v1.2: "or a request is refused by the
limit, once per window and limit")

A refused request's statement rolls back, and the event ``tokens_limit`` would write with it:
``tokens_limit_refused`` writes it afterwards, in a transaction of its own (a batch's refused
item: in the batch's), once per window and limit, sharing ``spend_limits.reached_at`` with a
movement that reaches the limit.

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0031"
down_revision: str | None = "0030"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    snapshot.apply("0031", "tokens_limit_refused")


def downgrade() -> None:
    op.execute("DROP FUNCTION tokens_limit_refused(text, text, text)")
