"""tokens_open(), tokens_hold(), tokens_extend() and tokens_spend_many(): opening an account,
extending a hold and a batch of debits go through the functions every movement uses

``tokens.open_account`` wrote its initial balance, ``tokens.extend`` held more tokens and
``tokens.debit_batch`` (and the coalescer) spent through accounting/grants.py's Python copies of
making a grant, writing an entry, choosing grants in burn order and spending them. Now:
- ``tokens_open`` inserts the account and, when it is new and has an initial balance, grants it
  with ``tokens_grant`` and writes the ``adjustment`` entry with ``tokens_write``;
- ``tokens_free_grants`` is the one definition of the burn order, which ``tokens_burn`` and
  ``tokens_hold`` read (each had its own copy of the ORDER BY);
- ``tokens_hold`` is the one definition of a hold (free tokens of live grants in burn order,
  counted in ``tokens_reserved``), used by ``tokens_reserve`` and ``tokens_extend``;
- ``tokens_extend`` claims the key, locks the reservation and the account (expiring due
  grants), holds more and keeps the hold alive: an extension never ends a hold sooner than it
  ends already (it did: ``ttl_seconds=600`` on a hold with an hour left cut it to ten minutes);
- ``tokens_spend_many`` takes a batch's keys and accounts' locks first (keys in (user, key)
  order, then accounts in user order) and applies each item through ``tokens_spend``;
- ``tokens_iso`` writes a time as the results do (``tokens_reserve`` had it inline).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

MADE = (
    "tokens_free_grants(text, timestamptz)",
    "tokens_spend_many(text[], text[], text[], text[], bigint[], boolean[], jsonb[])",
    "tokens_extend(text, text, text, bigint, integer)",
    "tokens_hold(text, text, bigint, timestamptz)",
    "tokens_iso(timestamptz)",
    "tokens_open(text, text, bigint, timestamptz, timestamptz)",
)


def upgrade() -> None:
    snapshot.apply(
        "0013",
        "tokens_free_grants",
        "tokens_burn",
        "tokens_open",
        "tokens_iso",
        "tokens_hold",
        "tokens_reserve",
        "tokens_extend",
        "tokens_spend_many",
    )


def downgrade() -> None:
    snapshot.apply("0010", "tokens_reserve")
    snapshot.apply("0008", "tokens_burn")
    for signature in MADE:
        op.execute(f"DROP FUNCTION IF EXISTS {signature}")
