"""tokens_ok(): a one-statement movement's refusal rolls the statement back when it runs alone

A movement function (``tokens_spend()`` and those after it) returns its refusal as a ``status``
and leaves what it did (the idempotency claim, expiries) to the caller's transaction, which rolls
back. A movement that runs alone, its connection in autocommit so that the statement is the
whole transaction (no BEGIN or COMMIT round trip), is called as
``SELECT r.* FROM tokens_x(...) AS r WHERE tokens_ok(to_jsonb(r))``: on a refusal ``tokens_ok``
raises SQLSTATE ``TKREF`` with the function's row as the error's DETAIL, and the error undoes
every effect of the statement (accounting/statements.py).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        snapshot.apply("0006", "tokens_ok")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS tokens_ok(jsonb)")
