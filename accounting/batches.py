"""Many debits in one transaction: one message, one commit, each item as ``movements.debit``.

``tokens.debit_batch(debits=[…])`` (an extension beside the contract) takes 1..1000 items, each
the kwargs of ``tokens.debit``. A malformed payload or item refuses the whole batch with
VALIDATION_ERROR (naming e.g. ``debits.3.amount``) and changes nothing; business refusals are
per item. Results come back in the order sent, each what ``tokens.debit`` would return, with
``applied`` (successes, replays included) and ``refused`` counts.

Each item runs in its own savepoint, so a refused item leaves no trace and keeps the others.
Nothing here commits; the caller owns the transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from accounting import idempotency, movements
from accounting.errors import DomainError
from models.schemas import DebitBatchOut, DebitIn, Failure, MovementOut
from models.tables import account_table

# Lock order, the same for every movement: idempotency keys first, then accounts. A batch
# claims all its keys (in (user, key) order), then locks its accounts (in user order), so two
# batches over the same accounts queue behind each other, and a batch and a single debit that
# share a key never each hold what the other waits for.
_LOCK_ACCOUNTS = (
    select(account_table.c.user_id)
    .where(account_table.c.user_id.in_(bindparam("ids", expanding=True)))
    .order_by(account_table.c.user_id)
    .with_for_update()
)


def item_key(item: DebitIn, task_id: str | None, index: int) -> str | None:
    """The item's own key, else one derived from the message, so a redelivery replays it."""
    if item.idempotency_key is not None:
        return item.idempotency_key
    return None if task_id is None else f"{task_id}:{index}"


def _asked(item: DebitIn) -> tuple[int, str, bool, dict[str, Any]]:
    return item.amount, item.operation_type, item.allow_overdraft, item.metadata


def debit_batch(session: Session, items: Sequence[DebitIn], task_id: str | None) -> DebitBatchOut:
    """Apply each item as :func:`movements.debit` would, in the order given.

    Returns one result per item: its movement, or the refusal ``tokens.debit`` would return.
    """
    keys = [item_key(item, task_id, index) for index, item in enumerate(items)]
    idempotency.claim_many(
        session,
        (
            (item.user_id, key, movements.debit_digest(*_asked(item)))
            for item, key in zip(items, keys, strict=True)
            if key is not None
        ),
    )
    session.execute(_LOCK_ACCOUNTS, {"ids": sorted({item.user_id for item in items})}).all()
    results: list[MovementOut | Failure] = []
    for item, key in zip(items, keys, strict=True):
        try:
            with session.begin_nested():
                results.append(movements.debit_payload(session, item, key))
        except DomainError as exc:
            idempotency.withdraw(session, item.user_id, key)
            results.append(Failure(error=exc.message, error_code=exc.code))
    refused = sum(isinstance(r, Failure) for r in results)
    return DebitBatchOut(results=results, applied=len(results) - refused, refused=refused)
