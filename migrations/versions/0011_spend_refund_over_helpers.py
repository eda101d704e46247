"""tokens_spend() and tokens_refund() over the shared helpers of migration 0008

Migration 0005's ``tokens_spend`` and 0007's ``tokens_refund`` were written before 0008 gave
the one-statement movements their helpers, and each carried its own copy of the idempotency
claim and of the account lock with the due grants' expiry; ``tokens_spend`` also its own burn
and write. Both now call the helpers every later movement calls (``tokens_claim``,
``tokens_lock``; for a spend also ``tokens_burn`` and ``tokens_write``), so the steps the Python
reference (accounting/grants.py) has once are written once in SQL too. Same signatures, same
rows, same refusals: the differential tests (tests/accounting/test_spend_statement.py) compare
both with the Python path. A refund keeps its own write, which records the original entry and
expires again what went back into an ended grant before storing its outcome.

The nested calls cost a debit a little of the server's time: pgbench on the statement, 1,000
users, medians of 3 interleaved rounds (2026-12-04, 2 cores) gave 2,530/s against 2,579/s for
0005's copy at one client and 4,070/s against 4,438/s at two (with synchronous_commit off, to
see the CPU alone: 4,389 against 4,542 and 8,546 against 9,462), about 2 to 8 %, or 0.01 to
0.04 ms of the 4.5 ms of machine time an end-to-end debit costs (bench.transport). One copy
of each step of a money path is worth that.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        snapshot.apply("0011", "tokens_spend", "tokens_refund")


def downgrade() -> None:
    # Back to the copies the earlier revisions made (same signatures: a replacement, no drop).
    if op.get_bind().dialect.name == "postgresql":
        snapshot.apply("0005", "tokens_spend")
        snapshot.apply("0007", "tokens_refund")
