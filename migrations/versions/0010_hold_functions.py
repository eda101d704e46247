"""tokens_reserve() and tokens_release(): a hold made or freed on PostgreSQL in one statement

``tokens_reserve()`` does what accounting/reservations.py ``reserve`` does through
accounting/grants.py (which stays the reference, and the code SQLite runs): claim the idempotency
key (replay or conflict when it exists), lock the account, expire the user's due grants (one
``expiry`` entry each), check the available tokens, write the reservation, hold its grants in burn
order (``reservation_grants``), count the hold in ``tokens_reserved`` and store the outcome.

``tokens_release()`` does what ``release`` does: read the reservation, claim the key, end the
reservation (a conditional update: of a capture, a release and the expiry sweep, the first to lock
the row wins), lock the account, free the grants it held and ``tokens_reserved``, expire the
user's grants now due (a held grant that ended meanwhile leaves now) and store the outcome.

Lock order as everywhere: the key, the reservation, the account, its grants. A refusal returns a
``status`` (never raises), as ``tokens_spend()`` does (migrations 0005, 0006). The claim, the
lock and the expiries are 0008's ``tokens_claim`` and ``tokens_lock`` and 0009's
``tokens_expire_due``.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DROP = (
    "tokens_release(text, text, text, text)",
    "tokens_reserve(text, text, text, text, bigint, text, integer, jsonb, bigint)",
)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        snapshot.apply("0010", "tokens_reserve", "tokens_release")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for signature in DROP:
            op.execute(f"DROP FUNCTION IF EXISTS {signature}")
