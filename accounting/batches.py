"""Many debits in one transaction: one message, one commit, each item as ``movements.debit``.

``tokens.debit_batch(debits=[…])`` (an extension beside the contract) takes 1..1000 items, each
the kwargs of ``tokens.debit``. A malformed payload or item refuses the whole batch with
VALIDATION_ERROR (naming e.g. ``debits.3.amount``) and changes nothing; business refusals are
per item. Results come back in the order sent, each what ``tokens.debit`` would return, with
``applied`` (successes, replays included) and ``refused`` counts.

On PostgreSQL the batch is applied set-based, in a fixed number of statements whatever its size
(:func:`_set_based`): claim every key, read what the keys already hold, lock and read every
account, read their spendable grants, work out each item in Python exactly as
``movements.debit`` would (refusals, overdrafts and burn order included), then write the grants,
accounts, ledger entries, splits and stored outcomes, one statement each. The accounts are locked
only for that last part, so a batch holds them for a few statements rather than for a movement
per item. A user whose grants are due (expiry entries come first) or whose items share a key
goes item by item, each in its own savepoint (:func:`_item_by_item`), as does SQLite.

Nothing here commits; the caller owns the transaction.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, text
from sqlalchemy.orm import Session

from accounting import clock, grants, idempotency, movements
from accounting.catalog import known_operation
from accounting.errors import (
    DomainError,
    idempotency_conflict,
    insufficient_tokens,
    invalid_amount,
    user_not_found,
)
from accounting.events import note_balance_change
from models.schemas import DebitBatchOut, DebitIn, Failure, MovementOut
from models.tables import (
    account_table,
    entry_grant_table,
    grant_table,
    idempotency_table,
    ledger_table,
)

# Lock order, the same for every movement: idempotency keys first, then accounts. A batch
# claims all its keys (in (user, key) order), then locks its accounts (in user order, in one
# statement), so a batch and a single debit that share a key never each hold what the other
# waits for, and two batches over the same accounts take them in the same order.
_a = account_table.c
_g = grant_table.c
_LOCK_ACCOUNTS = (
    select(_a.user_id)
    .where(_a.user_id.in_(bindparam("ids", expanding=True)))
    .order_by(_a.user_id)
    .with_for_update()
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
    return Failure(error=exc.message, error_code=exc.code)


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
    return _set_based(session, items, keys)


def debit_batch_item_by_item(
    session: Session, items: Sequence[DebitIn], task_id: str | None
) -> DebitBatchOut:
    """Every item through ``movements.debit`` in its own savepoint: the baseline
    ``bench/debit_batches.py`` measures the set-based path against."""
    return _all_item_by_item(session, items, [item_key(i, task_id, n) for n, i in enumerate(items)])


def _all_item_by_item(
    session: Session, items: Sequence[DebitIn], keys: Sequence[str | None]
) -> DebitBatchOut:
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
        results.append(_item_by_item(session, item, key))
    return _out(results)


def _item_by_item(session: Session, item: DebitIn, key: str | None) -> MovementOut | Failure:
    try:
        with session.begin_nested():
            return movements.debit_payload(session, item, key)
    except DomainError as exc:
        idempotency.withdraw(session, item.user_id, key)
        return _refusal(exc)


# --- the set-based path (PostgreSQL) -----------------------------------------------------------

_CLAIM = text(
    f"""
    INSERT INTO {idempotency_table.name} (user_id, key, request_hash, created_at)
    SELECT c.u, c.k, c.h, clock_timestamp()
    FROM unnest(CAST(:u AS text[]), CAST(:k AS text[]), CAST(:h AS text[]))
        WITH ORDINALITY AS c(u, k, h, n)
    ORDER BY c.n
    ON CONFLICT DO NOTHING
    RETURNING user_id, key
    """
)
_READ_CLAIMS = text(
    f"""
    SELECT r.user_id, r.key, r.request_hash, r.response
    FROM {idempotency_table.name} r
    JOIN unnest(CAST(:u AS text[]), CAST(:k AS text[])) AS c(u, k)
        ON r.user_id = c.u AND r.key = c.k
    """
)
_RECORD = text(
    f"""
    UPDATE {idempotency_table.name} r SET response = c.response
    FROM unnest(CAST(:u AS text[]), CAST(:k AS text[]), CAST(:response AS jsonb[]))
        AS c(u, k, response)
    WHERE r.user_id = c.u AND r.key = c.k
    """
)
_WITHDRAW = text(
    f"""
    DELETE FROM {idempotency_table.name} r
    USING unnest(CAST(:u AS text[]), CAST(:k AS text[])) AS c(u, k)
    WHERE r.user_id = c.u AND r.key = c.k AND r.response IS NULL
    """
)
_MOVE_ACCOUNTS = text(
    f"""
    UPDATE {account_table.name} a
    SET tokens_balance = c.balance, debt = c.debt, tokens_spent = c.spent, updated_at = c.now
    FROM unnest(CAST(:u AS text[]), CAST(:balance AS bigint[]), CAST(:debt AS bigint[]),
                CAST(:spent AS bigint[]), CAST(:now AS timestamptz[]))
        AS c(u, balance, debt, spent, now)
    WHERE a.user_id = c.u
    """
)
_SPEND_GRANTS = text(
    f"""
    UPDATE {grant_table.name} g
    SET remaining = g.remaining - c.take, spent = g.spent + c.take,
        status = CASE WHEN g.remaining = c.take THEN '{grants.DEPLETED}' ELSE g.status END,
        ended_at = CASE WHEN g.remaining = c.take THEN c.now ELSE g.ended_at END
    FROM unnest(CAST(:gid AS bigint[]), CAST(:take AS bigint[]), CAST(:now AS timestamptz[]))
        AS c(gid, take, now)
    WHERE g.id = c.gid
    """
)
_HELD = (
    select(
        _a.user_id, _a.tokens_balance, _a.tokens_reserved, _a.tokens_spent, _a.debt, _a.updated_at
    )
    .where(_a.user_id.in_(bindparam("ids", expanding=True)))
    .order_by(_a.user_id)
    .with_for_update()
    .subquery()
)
# The time is read around the locking query, once each row is held (see grants.lock).
_LOCK_AND_READ = select(
    _HELD.c.user_id,
    _HELD.c.tokens_balance,
    _HELD.c.tokens_reserved,
    _HELD.c.tokens_spent,
    _HELD.c.debt,
    clock.stamp(_HELD.c.updated_at),
).order_by(_HELD.c.user_id)
# Read after the lock (a statement of its own, so READ COMMITTED reads what the previous holder
# of each lock committed): every grant with free tokens, in burn order, the due ones included.
_FREE_GRANTS = (
    select(_g.user_id, _g.id, _g.remaining - _g.held, _g.expires_at)
    .where(
        _g.user_id.in_(bindparam("ids", expanding=True)),
        _g.status == grants.ACTIVE,
        _g.remaining > _g.held,
    )
    .order_by(_g.user_id, *grants.BURN_ORDER)
)
_INSERT_ENTRIES = insert(ledger_table).returning(ledger_table.c.id, sort_by_parameter_order=True)


@dataclass
class _Account:
    """A locked account as the batch moves it, and its spendable grants in burn order."""

    balance: int
    reserved: int
    spent: int
    debt: int
    now: datetime
    free: list[list[int]] = field(default_factory=list)  # [grant id, free tokens]
    due: bool = False


@dataclass
class _Applied:
    index: int
    item: DebitIn
    key: str | None
    balance_after: int
    spent_after: int
    splits: list[tuple[int, int]]


def _set_based(
    session: Session, items: Sequence[DebitIn], keys: Sequence[str | None]
) -> DebitBatchOut:
    results: list[MovementOut | Failure | None] = [None] * len(items)
    digests: dict[int, str] = {}
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
        if keys[index] is not None:
            digests[index] = movements.debit_digest(*_asked(item))

    # Keys first, in (user, key) order; the first item with a key gives its digest.
    first: dict[tuple[str, str], int] = {}
    for index in pending:
        key = keys[index]
        if key is not None:
            first.setdefault((items[index].user_id, key), index)
    claims = sorted(first)
    claimed: set[tuple[str, str]] = set()
    if claims:
        rows = session.execute(
            _CLAIM,
            {
                "u": [u for u, _ in claims],
                "k": [k for _, k in claims],
                "h": [digests[first[c]] for c in claims],
            },
        ).all()
        claimed = {(u, k) for u, k in rows}
    held = [c for c in claims if c not in claimed]
    stored: dict[tuple[str, str], tuple[str, dict[str, Any] | None]] = {}
    if held:
        for u, k, digest, response in session.execute(
            _READ_CLAIMS, {"u": [u for u, _ in held], "k": [k for _, k in held]}
        ):
            stored[(u, k)] = (digest, response)

    # A user whose items share a key goes item by item: the first may be refused and free the
    # key for the next, or apply and make it a replay.
    seen: set[tuple[str, str]] = set()
    slow: set[str] = set()
    for index in pending:
        key = keys[index]
        if key is not None:
            pair = (items[index].user_id, key)
            if pair in seen:
                slow.add(pair[0])
            seen.add(pair)

    accounts = _lock_and_read(session, sorted({items[index].user_id for index in pending}))
    slow |= {uid for uid, account in accounts.items() if account.due}

    applied: list[_Applied] = []
    withdrawn: list[tuple[str, str]] = []
    for index in pending:
        item, key = items[index], keys[index]
        if item.user_id in slow:
            continue
        if key is not None and (item.user_id, key) in stored:
            digest, response = stored[(item.user_id, key)]
            if digest != digests[index]:
                results[index] = _refusal(idempotency_conflict())
                continue
            if response is not None:
                results[index] = MovementOut(**{**response, "replayed": True})
                continue
        try:
            applied.append(_spend(accounts.get(item.user_id), index, item, key))
        except DomainError as exc:
            results[index] = _refusal(exc)
            if key is not None:
                withdrawn.append((item.user_id, key))

    if applied:
        _write(session, accounts, applied, results)
    if withdrawn:
        session.execute(_WITHDRAW, {"u": [u for u, _ in withdrawn], "k": [k for _, k in withdrawn]})
    for index in pending:
        if items[index].user_id in slow:
            results[index] = _item_by_item(session, items[index], keys[index])
    done = [r for r in results if r is not None]
    assert len(done) == len(items)
    return _out(done)


def _lock_and_read(session: Session, users: list[str]) -> dict[str, _Account]:
    """Lock the users' accounts (in user order, one statement) and read them and their
    spendable grants."""
    accounts: dict[str, _Account] = {}
    if not users:
        return accounts
    for uid, balance, reserved, spent, debt, now in session.execute(_LOCK_AND_READ, {"ids": users}):
        accounts[uid] = _Account(int(balance), int(reserved), int(spent), int(debt), now)
    for uid, gid, free, expires_at in session.execute(_FREE_GRANTS, {"ids": list(accounts)}):
        account = accounts[uid]
        if expires_at is not None and expires_at <= account.now:
            account.due = True
        else:
            account.free.append([int(gid), int(free)])
    return accounts


def _spend(account: _Account | None, index: int, item: DebitIn, key: str | None) -> _Applied:
    """``movements.debit`` on the batch's copy of the account: the refusals it makes after the
    account is locked, then ``grants.Change.spend`` (burn order, then debt)."""
    if account is None:
        raise user_not_found()
    available = account.balance - account.reserved
    if not item.allow_overdraft and available < item.amount:
        raise insufficient_tokens(item.amount, available)
    taken, left = grants.burn(account.free, item.amount)
    took = dict(taken)
    for grant in account.free:
        grant[1] -= took.get(grant[0], 0)
    splits = [(grant_id, -take) for grant_id, take in taken]
    account.debt += left
    account.balance -= item.amount
    account.spent = max(account.spent + item.amount, 0)
    return _Applied(index, item, key, account.balance, account.spent, splits)


def _write(
    session: Session,
    accounts: dict[str, _Account],
    applied: list[_Applied],
    results: list[MovementOut | Failure | None],
) -> None:
    """The batch's effects, one statement each: grants, accounts, entries, splits, outcomes."""
    taken: dict[int, int] = defaultdict(int)
    grant_now: dict[int, datetime] = {}
    for a in applied:
        for gid, amount in a.splits:
            taken[gid] -= amount
            grant_now[gid] = accounts[a.item.user_id].now
    if taken:
        gids = sorted(taken)
        session.execute(
            _SPEND_GRANTS,
            {"gid": gids, "take": [taken[g] for g in gids], "now": [grant_now[g] for g in gids]},
        )
    moved = sorted({a.item.user_id for a in applied})
    session.execute(
        _MOVE_ACCOUNTS,
        {
            "u": moved,
            "balance": [accounts[u].balance for u in moved],
            "debt": [accounts[u].debt for u in moved],
            "spent": [accounts[u].spent for u in moved],
            "now": [accounts[u].now for u in moved],
        },
    )
    entry_ids = session.scalars(
        _INSERT_ENTRIES,
        [
            {
                "user_id": a.item.user_id,
                "kind": "debit",
                "operation_type": a.item.operation_type,
                "tokens_amount": -a.item.amount,
                "balance_before": a.balance_after + a.item.amount,
                "balance_after": a.balance_after,
                "idempotency_key": a.key,
                "original_entry_id": None,
                "metadata": a.item.metadata,
                "created_at": accounts[a.item.user_id].now,
            }
            for a in applied
        ],
    ).all()
    splits = [
        {"entry_id": entry_id, "grant_id": gid, "amount": amount, "seq": seq}
        for a, entry_id in zip(applied, entry_ids, strict=True)
        for seq, (gid, amount) in enumerate(a.splits)
    ]
    if splits:
        session.execute(insert(entry_grant_table), splits)
    recorded: list[tuple[str, str, str]] = []
    for a, entry_id in zip(applied, entry_ids, strict=True):
        out = MovementOut(
            user_id=a.item.user_id,
            operation_type=a.item.operation_type,
            amount=-a.item.amount,
            balance_before=a.balance_after + a.item.amount,
            new_balance=a.balance_after,
            tokens_spent=a.spent_after,
            ledger_entry_id=str(entry_id),
        )
        results[a.index] = out
        if a.key is not None:
            recorded.append((a.item.user_id, a.key, out.model_dump_json()))
        note_balance_change(
            session,
            user_id=a.item.user_id,
            balance=a.balance_after,
            tokens_reserved=accounts[a.item.user_id].reserved,
            operation="debit",
        )
    if recorded:
        session.execute(
            _RECORD,
            {
                "u": [u for u, _, _ in recorded],
                "k": [k for _, k, _ in recorded],
                "response": [r for _, _, r in recorded],
            },
        )
