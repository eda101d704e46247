"""tokens_capture(): a capture on PostgreSQL in one statement and one round trip

The function does what accounting/reservations.py ``capture`` does through accounting/grants.py
(which stays the reference, and the code SQLite runs): read the reservation, claim the idempotency
key (replay or conflict when it exists), refuse an ended or expired reservation, a capture past
the hold plus its over-capture limit or merged metadata past the bound, end the reservation with
a conditional update (the hold read again under its lock), lock the account, expire the user's
due grants, spend the held grants in burn order (even one that has ended meanwhile) and past the
hold the free grants in burn order then debt, move the account, write the ledger entry with its
split, expire what the rest of the hold leaves in ended grants, and store the outcome under the
key. Lock order: key, reservation, account, grants.

A refusal (``status`` other than ``ok`` or ``replay``) returns instead of raising; alone,
``tokens_ok()`` (0006) turns it into an error that undoes the statement.

It is built on 0008's helpers: ``tokens_claim`` (the key), ``tokens_lock`` (the account lock
and the due grants' expiry, ``expired_*``) and ``tokens_burn`` (free grants in burn order, past
the hold). Its own: ``tokens_expire_due()``, grants.expire_due at the movement's time (each grant
through 0007's ``tokens_expire_grant``), for what the capture freed of ended grants after its
entry (``ended_*``); the account's move and the entry are written here, not by ``tokens_write``,
since a capture also ends the hold in ``tokens_reserved`` and its result adds ``overcaptured`` and
``shortfall``.
``tokens_json_bytes()`` is the size models.schemas.metadata_bytes gives a stored JSON value once
Python has read it back (a number with a point is a float to ``json.loads``: its ``repr``).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        snapshot.apply("0009", "tokens_json_bytes", "tokens_expire_due", "tokens_capture")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "DROP FUNCTION IF EXISTS tokens_capture("
            "text, bigint, jsonb, bigint, bigint, text, text, timestamptz)"
        )
        op.execute("DROP FUNCTION IF EXISTS tokens_expire_due(text, timestamptz)")
        op.execute("DROP FUNCTION IF EXISTS tokens_json_bytes(jsonb)")
