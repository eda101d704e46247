"""tokens_refund(): a refund on PostgreSQL in one statement and one round trip

The function does what accounting/movements.py ``refund`` does through accounting/grants.py
(which stays the reference, and the code SQLite runs): claim the idempotency key (replay or
conflict when it exists); against an original entry, find it and count the refund against its
``refund_totals`` row (one upsert checks and adds, so concurrent refunds of one entry serialise
on that row); lock the account, expire the user's due grants (one ``expiry`` entry each), put
the tokens back where the original entry took them from, last spent first (``_put_back``) or,
without one, make an ``adjustment`` grant (paying debt first); move the account, write the
ledger entry with its split, expire again at once what went back into an ended grant
(``grants.expire_grant``), and store the outcome under the key.

Lock order, as on the Python path: key -> refund cap (the refund_totals row) -> account ->
grants. A refusal (``status`` other than ``ok`` or ``replay``) returns instead of raising.

``tokens_expire_grant()`` writes off tokens of one grant through its own ``expiry`` entry
(``grants.expire_grant``); the account must be locked.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        snapshot.apply("0007", "tokens_expire_grant", "tokens_refund")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS tokens_refund(text, text, text, bigint, bigint, jsonb)")
        op.execute("DROP FUNCTION IF EXISTS tokens_expire_grant(text, bigint, bigint, timestamptz)")
