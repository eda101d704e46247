"""tokens.set_limit keeps the buckets a limit of the same width already counts

``tokens_set_limit`` made a limit's buckets again from the ledger every time, so changing a
limit (or adding one of the same width) after ``ledger.delete_old_entries`` had removed entries
of the window forgot what they spent (the oracle's finding, tests/accounting/
test_oracle_findings.py). Buckets a limit of the same width has read from as far back are
complete (made from the ledger, then counted by every movement) and now stay.

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

from migrations import snapshot

revision: str = "0034"
down_revision: str | None = "0033"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    snapshot.apply("0034", "tokens_set_limit")


def downgrade() -> None:
    snapshot.apply("0022", "tokens_set_limit")
