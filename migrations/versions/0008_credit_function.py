"""tokens_credit() and tokens_reset(): a credit or a balance reset on PostgreSQL in one statement

They do what accounting/movements.py ``credit`` and ``reset_balance`` do through
accounting/grants.py (which stays the reference, and the code SQLite runs): claim the idempotency
key (replay or conflict when it exists), lock the account, expire the user's due grants (one
``expiry`` entry each), check the request against the locked account, make a grant that pays the
debt first (a credit, a reset upwards) or spend in burn order (a reset downwards, never into
debt), move the account, write the ledger entry with its split, and store the outcome under the
key. A refusal returns its ``status``, as ``tokens_spend()`` (migration 0005) does.

They are built from helpers that follow accounting/grants.py step by step: ``tokens_claim``
(idempotency.claim), ``tokens_lock`` (grants.lock_current: the lock, then the due grants'
expiry), ``tokens_grant`` (grants.Change.grant), ``tokens_burn`` (grants.Change.spend) and
``tokens_write`` (grants.write, with idempotency.record); an expiry is migration 0007's
``tokens_expire_grant`` (grants.expire_grant). Each is one plpgsql call inside the
movement's statement, so the movement stays one round trip. The grants are read only after the
account row lock (``tokens_lock``), each statement with a fresh snapshot (VOLATILE, READ
COMMITTED).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SIGNATURES = (
    "tokens_credit(text, text, text, text, text, bigint, integer, timestamptz, jsonb)",
    "tokens_reset(text, text, text, text, bigint, integer, jsonb)",
    "tokens_burn(text, bigint, timestamptz)",
    "tokens_grant(text, text, bigint, integer, timestamptz, bigint, timestamptz)",
    "tokens_lock(text)",
    "tokens_write(text, text, text, bigint, bigint, bigint, text, jsonb, timestamptz,"
    " bigint[], bigint[])",
    "tokens_claim(text, text, text)",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        snapshot.apply(
            "0008",
            "tokens_claim",
            "tokens_write",
            "tokens_lock",
            "tokens_grant",
            "tokens_burn",
            "tokens_credit",
            "tokens_reset",
        )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for signature in SIGNATURES:
            op.execute(f"DROP FUNCTION IF EXISTS {signature}")
