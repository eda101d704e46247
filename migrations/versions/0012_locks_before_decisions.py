"""Decide under the lock: the time after the account lock, the refund cap under it, cap rows
that go with their entry, and every grant's change in some entry's split

Issue 20's defects and suspicions, on PostgreSQL:

- ``tokens_lock`` and ``tokens_release`` read ``clock_timestamp()`` in the statement that waited
  for the account's row lock. PostgreSQL computes a locking query's output before the lock is
  granted and recomputes it only when the holder changed the row: a holder that left the row as
  it was (a refusal, a reader) gave back the time the wait began, and a grant that ended during
  the wait could still be spent. The lock is now taken in a subquery and the time read above it,
  once the row is held (a subquery with ``FOR UPDATE`` is never flattened into its parent).
- ``tokens_refund`` read the original entry before the account lock and without a lock of its
  own, then waited on the ``refund_totals`` row a prune was deleting, and made a fresh cap row
  once the prune had committed: 160 refunded against a debit of 100. The refund now takes the
  account lock first (as every movement, and now the prune, does), reads the original entry
  under it and holds it with ``FOR KEY SHARE`` until it commits, so an entry a prune removed is
  ``ENTRY_NOT_FOUND`` and an entry being refunded cannot be removed until the refund is done.
- ``refund_totals.entry_id`` references its entry (``ON DELETE CASCADE``): a cap row lives exactly
  as long as its entry, whichever transaction removes the entry. Rows left by earlier prunes
  whose entry is gone are deleted first.
- A prune now carries its entries' splits forward to the ``carried_forward`` entry
  (accounting/ledger.py); the splits earlier prunes dropped, and those of the grants migration 0004
  made from balances (no entry created them), are restored here onto the user's first entry,
  which stands for the history before splits were kept. After this, every grant's ``remaining``
  is the sum of its entries' splits, which ``ledger.reconcile`` now checks.
- ``tokens_json_bytes`` measured a number as Python's ``repr`` of the float read back, while
  the metadata bound measured what the producer sent: ``{"x": 1e300}`` passed as 12 bytes and
  was stored as 307. The bound now measures what is stored (models.schemas.metadata_bytes writes
  each float as PostgreSQL's numeric does), and so does this function: a number's own text.

Lock order everywhere: idempotency key -> reservation -> account -> original entry / cap row ->
grants.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_refund_totals_entry_id_ledger_entries"


def upgrade() -> None:
    op.execute("DELETE FROM refund_totals WHERE entry_id NOT IN (SELECT id FROM ledger_entries)")
    with op.batch_alter_table("refund_totals") as refund_totals:
        refund_totals.create_foreign_key(
            FK, "ledger_entries", ["entry_id"], ["id"], ondelete="CASCADE"
        )
    snapshot.apply("0012", "restore_splits")
    if op.get_bind().dialect.name == "postgresql":
        functions = ("tokens_lock", "tokens_release", "tokens_refund", "tokens_json_bytes")
        snapshot.apply("0012", *functions)


def downgrade() -> None:
    # The splits restored stay: they are true, and the earlier revisions never read them.
    if op.get_bind().dialect.name == "postgresql":
        snapshot.apply("0008", "tokens_lock")
        snapshot.apply("0010", "tokens_release")
        snapshot.apply("0011", "tokens_refund")
        snapshot.apply("0009", "tokens_json_bytes")
    with op.batch_alter_table("refund_totals") as refund_totals:
        refund_totals.drop_constraint(FK, type_="foreignkey")
