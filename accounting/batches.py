"""Many debits in one transaction: one message, one commit, each item as ``movements.debit``.

``tokens.debit_batch(debits=[…])`` (an extension beside the contract) takes 1..1000 items, each
the kwargs of ``tokens.debit``. A malformed payload or item refuses the whole batch with
VALIDATION_ERROR (naming e.g. ``debits.3.amount``) and changes nothing; business refusals are
per item. Results come back in the order sent, each what ``tokens.debit`` would return, with
``applied`` (successes, replays included) and ``refused`` counts.

The batch is one statement, ``tokens_spend_many`` (sql/movements/tokens_spend_many.sql): it
takes the keys and the accounts' locks first, in the order every movement takes them, then
applies each item through ``tokens_spend``, the one definition of a debit. The coalescer sends
its collected single debits the same way (:func:`debit_many`).

Nothing here commits; the caller owns the transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, select, text
from sqlalchemy.orm import Session

from accounting import idempotency, limits, movements, spend
from accounting.catalog import known_operation
from accounting.errors import (
    DomainError,
    LimitExceeded,
    invalid_amount,
)
from models.schemas import DebitBatchOut, DebitIn, Failure, MovementOut
from models.tables import Account

_LOCK_ACCOUNTS = (
    select(Account.user_id)
    .where(Account.user_id.in_(bindparam("ids", expanding=True)))
    .order_by(Account.user_id)
    .with_for_update()
)
_SPEND_MANY = text(
    "SELECT * FROM tokens_spend_many(CAST(:users AS text[]), CAST(:keys AS text[]),"
    " CAST(:digests AS text[]), CAST(:ops AS text[]), CAST(:amounts AS bigint[]),"
    " CAST(:overdrafts AS boolean[]), CAST(:metadata AS jsonb[]))"
)


def item_key(item: DebitIn, task_id: str | None, index: int) -> str | None:
    """The item's own key, else one derived from the message, so a redelivery replays it."""
    if item.idempotency_key is not None:
        return item.idempotency_key
    return None if task_id is None else f"{task_id}:{index}"


def _asked(item: DebitIn) -> tuple[int, str, bool, dict[str, Any]]:
    return item.amount, item.operation_type, item.allow_overdraft, item.metadata


def _out(results: list[MovementOut | Failure]) -> DebitBatchOut:
    refused = sum(isinstance(r, Failure) for r in results)
    return DebitBatchOut(results=results, applied=len(results) - refused, refused=refused)


def _refusal(exc: DomainError) -> Failure:
    return Failure(error=exc.message, error_code=exc.code, **exc.fields)


def debit_batch(session: Session, items: Sequence[DebitIn], task_id: str | None) -> DebitBatchOut:
    """Apply each item as :func:`movements.debit` would, in the order given.

    Returns one result per item: its movement, or the refusal ``tokens.debit`` would return.
    """
    return debit_many(session, items, [item_key(i, task_id, n) for n, i in enumerate(items)])


def debit_many(
    session: Session, items: Sequence[DebitIn], keys: Sequence[str | None]
) -> DebitBatchOut:
    """:func:`debit_batch` with each item's idempotency key given (the coalescer gives each
    single debit its own, as ``tokens.debit`` would: its key, else its task id)."""
    results: list[MovementOut | Failure | None] = [None] * len(items)
    pending: list[int] = []  # items that pass the checks tokens.debit makes before its key
    for index, item in enumerate(items):
        try:
            if item.amount <= 0:
                raise invalid_amount("Debit")
            known_operation(item.operation_type)
        except DomainError as exc:
            results[index] = _refusal(exc)
            continue
        pending.append(index)
    if pending:
        rows = session.execute(
            _SPEND_MANY,
            {
                "users": [items[i].user_id for i in pending],
                "keys": [keys[i] for i in pending],
                "digests": [
                    None if keys[i] is None else movements.debit_digest(*_asked(items[i]))
                    for i in pending
                ],
                "ops": [items[i].operation_type for i in pending],
                "amounts": [items[i].amount for i in pending],
                "overdrafts": [items[i].allow_overdraft for i in pending],
                "metadata": [json.dumps(items[i].metadata) for i in pending],
            },
        ).all()
        for index, row in zip(pending, rows, strict=True):
            results[index] = _result(session, items[index], row)
    done = [r for r in results if r is not None]
    assert len(done) == len(items)
    return _out(done)


def _result(session: Session, item: DebitIn, row: Any) -> MovementOut | Failure:
    """One item's row: its movement (and events), or the refusal ``tokens.debit`` gives."""
    try:
        return spend.outcome(session, row, user_id=item.user_id, kind="debit", amount=item.amount)
    except LimitExceeded as exc:
        limits.note_refused(session, exc)  # the batch commits: its event goes with it
        return _refusal(exc)
    except DomainError as exc:
        return _refusal(exc)


def debit_batch_item_by_item(
    session: Session, items: Sequence[DebitIn], task_id: str | None
) -> DebitBatchOut:
    """Every item through ``movements.debit`` in its own savepoint: the baseline
    ``bench/debit_batches.py`` measures the batch statement against."""
    keys = [item_key(i, task_id, n) for n, i in enumerate(items)]
    # The locks first, in the order every movement takes them (as tokens_spend_many does).
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
            results.append(_refusal(exc))
    return _out(results)
