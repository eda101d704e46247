"""Ledger queries, pruning and reconciliation."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    case,
    func,
    not_,
    or_,
    select,
    text,
)
from sqlalchemy.orm import Session

from accounting import grants, months
from models.schemas import (
    DeletedOut,
    EntriesOut,
    EntryOut,
    EntrySplit,
    Mismatch,
    ReconcileOut,
    StatisticsOut,
    TotalOut,
    TypeStats,
)
from models.tables import Account, LedgerEntry, entry_grant_table, grant_table

CARRIED_FORWARD = "carried_forward"
_eg = entry_grant_table.c
MAX_MISMATCHES_LISTED = 1000


def entry_out(entry: Any, splits: list[EntrySplit] | None = None) -> EntryOut:
    """An entry for the contract, from a row with the entry's columns (an event's stored row)."""
    return EntryOut(
        grants=splits or [],
        id=str(entry.id),
        user_id=entry.user_id,
        operation_type=entry.operation_type,
        tokens_amount=entry.tokens_amount,
        balance_before=entry.balance_before,
        balance_after=entry.balance_after,
        idempotency_key=entry.idempotency_key,
        original_entry_id=None if entry.original_entry_id is None else str(entry.original_entry_id),
        metadata=entry.metadata,
        created_at=entry.created_at,
        spent_by=entry.spent_by,
        # An event stored before the chain existed renders its entry without one.
        prev_hash=getattr(entry, "prev_hash", None),
        hash=getattr(entry, "hash", None),
    )


_e = LedgerEntry.__table__.c


def _period(start_date: datetime | None, end_date: datetime | None) -> list[ColumnElement[bool]]:
    """``start_date`` inclusive, ``end_date`` exclusive, so adjacent periods never overlap."""
    conditions: list[ColumnElement[bool]] = []
    if start_date is not None:
        conditions.append(LedgerEntry.created_at >= start_date)
    if end_date is not None:
        conditions.append(LedgerEntry.created_at < end_date)
    return conditions


_PAGE = text(
    "SELECT entries, due FROM tokens_page(:user_id, :operation_type,"
    " CAST(:start_date AS timestamptz), CAST(:end_date AS timestamptz),"
    " CAST(:limit AS integer), CAST(:offset AS bigint))"
)


def _page(
    session: Session,
    user_id: str | None,
    operation_type: str | None,
    start_date: datetime | None,
    end_date: datetime | None,
    limit: int,
    offset: int,
) -> tuple[EntriesOut, bool]:
    """A page of the ledger (``tokens_page``, sql/ledger/tokens_page.sql), and whether the
    account whose ledger it is has a grant due to expire. The page comes as the JSON of its
    entries, rendered by PostgreSQL and read by pydantic's JSON parser: building 50 entries and
    their splits from rows, column by column, cost more than reading them."""
    entries, due = session.execute(
        _PAGE,
        {
            "user_id": user_id,
            "operation_type": operation_type,
            "start_date": start_date,
            "end_date": end_date,
            "limit": limit,
            "offset": offset,
        },
    ).one()
    return EntriesOut.model_validate_json(f'{{"entries":{entries}}}'), bool(due)


def _whose(session: Session, user_id: str) -> tuple[ColumnElement[bool], str]:
    """Which entries are ``user_id``'s, and the account whose due grants a read of them settles:
    an account's own ledger (a pool's has its members' entries too), or for a member (contract
    v1.2) the entries it spent in its pool's ledger."""
    pool = session.execute(
        select(Account.pool_id).where(Account.user_id == user_id)
    ).scalar_one_or_none()
    if pool is None:
        return _e.user_id == user_id, user_id
    return and_(_e.spent_by == user_id, _e.user_id == pool), pool


def user_entries(
    session: Session,
    user_id: str,
    operation_type: str | None = None,
    start_date: datetime | None = None,
    end_date: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> EntriesOut:
    """A page of ``user_id``'s history, after their due grants have expired. The page is read
    together with the probe for due grants; only when one was due are they expired and the page
    read again."""
    args = (operation_type, start_date, end_date, limit, offset)
    page, due = _page(session, user_id, *args)
    if not due:
        return page
    grants.settle_reads(session, _whose(session, user_id)[1])
    return _page(session, user_id, *args)[0]


def entries_by_type(
    session: Session,
    operation_type: str,
    start_date: datetime | None = None,
    end_date: datetime | None = None,
    limit: int = 50,
    offset: int = 0,
) -> EntriesOut:
    return _page(session, None, operation_type, start_date, end_date, limit, offset)[0]


def _sums(
    session: Session, user_id: str, start_date: datetime | None, end_date: datetime | None
) -> tuple[int, int, int]:
    """(spent, earned, count): spent sums the negative entries, earned the positive ones."""
    whose, pool = _whose(session, user_id)
    grants.settle_reads(session, pool)
    amount = LedgerEntry.tokens_amount
    row = session.execute(
        select(
            func.coalesce(func.sum(case((amount < 0, -amount), else_=0)), 0),
            func.coalesce(func.sum(case((amount > 0, amount), else_=0)), 0),
            func.count(),
        ).where(whose, *_period(start_date, end_date))
    ).one()
    return int(row[0]), int(row[1]), int(row[2])


def total_spent(
    session: Session,
    user_id: str,
    start_date: datetime | None = None,
    end_date: datetime | None = None,
) -> TotalOut:
    return TotalOut(total=_sums(session, user_id, start_date, end_date)[0])


def total_earned(
    session: Session,
    user_id: str,
    start_date: datetime | None = None,
    end_date: datetime | None = None,
) -> TotalOut:
    return TotalOut(total=_sums(session, user_id, start_date, end_date)[1])


def statistics(
    session: Session,
    user_id: str,
    start_date: datetime | None = None,
    end_date: datetime | None = None,
) -> StatisticsOut:
    spent, earned, count = _sums(session, user_id, start_date, end_date)  # settles due grants
    by_type = session.execute(
        select(LedgerEntry.operation_type, func.count(), func.sum(LedgerEntry.tokens_amount))
        .where(_whose(session, user_id)[0], *_period(start_date, end_date))
        .group_by(LedgerEntry.operation_type)
        .order_by(LedgerEntry.operation_type)
    ).all()
    return StatisticsOut(
        total_spent=spent,
        total_earned=earned,
        net_change=earned - spent,
        operation_count=count,
        by_type={name: TypeStats(count=n, total=int(total)) for name, n, total in by_type},
    )


def delete_old_entries(session: Session, older_than: datetime) -> DeletedOut:
    """Delete entries created before ``older_than``; each affected user keeps one
    ``carried_forward`` entry holding the sum removed, so balance == sum of ledger still holds,
    and the removed entries' splits summed per grant, so every grant's ``remaining`` is still
    the sum of its entries' splits.

    An earlier ``carried_forward`` entry is folded into the new one, but neither it nor a user
    with nothing else to prune counts or is rewritten: running it again changes nothing. All in
    the caller's transaction; :func:`delete_old_entries_in_chunks` commits as it goes.
    """
    deleted = 0
    after: str | None = None
    while users := _prune_page(session, older_than, after, PRUNE_PAGE):
        deleted += users[1]
        after = users[0][-1]
    return DeletedOut(deleted=deleted)


PRUNE_PAGE = 1000


def _prunable(older_than: datetime) -> ColumnElement[bool]:
    return and_(LedgerEntry.created_at < older_than, LedgerEntry.kind != CARRIED_FORWARD)


def count_old_entries(session: Session, older_than: datetime) -> DeletedOut:
    """What :func:`delete_old_entries` would delete now (its ``deleted``), changing nothing."""
    count = session.execute(select(func.count()).where(_prunable(older_than))).scalar_one()
    return DeletedOut(deleted=int(count))


def users_with_old_entries(session: Session, older_than: datetime) -> int:
    """How many users :func:`delete_old_entries` would prune now."""
    users = select(LedgerEntry.user_id).where(_prunable(older_than)).distinct().subquery()
    return int(session.execute(select(func.count()).select_from(users)).scalar_one())


def delete_old_entries_in_chunks(
    sessions: Callable[[], Session],
    older_than: datetime,
    users_per_chunk: int = PRUNE_PAGE,
    progress: Callable[[int], None] | None = None,
) -> DeletedOut:
    """:func:`delete_old_entries` in one transaction per ``users_per_chunk`` users (in user id
    order), so a large prune holds no lock for long and can report ``progress(users)`` after each
    commit. First, in a transaction of its own, the ledger's months wholly before ``older_than``
    are dropped whole (:func:`accounting.months.drop_old_months`) where they can be: what is left
    is pruned entry by entry. The result is the one-transaction prune's."""
    with sessions() as session, session.begin():
        _dropped, deleted = months.drop_old_months(session, older_than)
    after: str | None = None
    while True:
        with sessions() as session, session.begin():
            page = _prune_page(session, older_than, after, users_per_chunk)
        if not page:
            break
        users, count = page
        deleted += count
        if progress is not None:
            progress(len(users))
        after = users[-1]
    return DeletedOut(deleted=deleted)


def _prune_page(
    session: Session, older_than: datetime, after: str | None, size: int
) -> tuple[list[str], int] | None:
    """Prune the next ``size`` users (in user id order, after ``after``) who have entries to
    prune (``tokens_prune``, sql/ledger/tokens_prune.sql: their accounts locked first, as every
    movement locks them); their ids and the entries deleted, or None when no user is left."""
    row = session.execute(
        _PRUNE,
        {"after": after, "size": size, "cutoff": older_than, "older_than": older_than.isoformat()},
    ).one()
    if not row.users:
        return None
    return list(row.users), int(row.deleted)


_PRUNE = text("SELECT * FROM tokens_prune(:after, :size, :cutoff, :older_than)")


_g = grant_table.c
# A grant's own arithmetic; reconcile counts the grants failing it and then names them.
_GRANT_ARITHMETIC_OK = and_(
    _g.remaining == _g.amount - _g.spent - _g.expired + _g.returned,
    _g.remaining >= 0,
    _g.held >= 0,
    _g.held <= _g.remaining,
    # Only an active grant holds tokens; an ended one holds none.
    or_(_g.status == "active", _g.remaining == 0),
)


def _grants_ok(user_id: str | None) -> tuple[Any, ColumnElement[bool]]:
    """The grants joined to the sum of their entries' splits, and what a sound grant satisfies:
    its own arithmetic, and a ``remaining`` that is the sum of its entries' splits (every
    change to a grant is in some entry's split; a pruned history's in its carried_forward)."""
    splits = select(_eg.grant_id, func.sum(_eg.amount).label("total")).group_by(_eg.grant_id)
    if user_id is not None:
        splits = splits.where(_eg.grant_id.in_(select(_g.id).where(_g.user_id == user_id)))
    split_sq = splits.subquery()
    joined = grant_table.outerjoin(split_sq, split_sq.c.grant_id == _g.id)
    return joined, and_(_GRANT_ARITHMETIC_OK, _g.remaining == func.coalesce(split_sq.c.total, 0))


def reconcile(session: Session, user_id: str | None = None) -> ReconcileOut:
    """Every user whose balance differs from the sum of their ledger, or from what their grants
    say (active grants' remaining - debt), or who has a grant whose own arithmetic fails
    (remaining = amount - spent - expired + returned, 0 <= held <= remaining) or whose
    remaining is not the sum of its entries' splits; at most 1000 listed. Set-based: one pass
    over each table, whatever the number of users."""
    sums = select(LedgerEntry.user_id, func.sum(LedgerEntry.tokens_amount).label("total")).group_by(
        LedgerEntry.user_id
    )
    joined, sound = _grants_ok(user_id)
    held = (
        select(
            _g.user_id,
            func.sum(case((_g.status == "active", _g.remaining), else_=0)).label("remaining"),
            func.sum(case((sound, 0), else_=1)).label("bad"),
        )
        .select_from(joined)
        .group_by(_g.user_id)
    )
    accounts = select(Account.user_id, Account.tokens_balance, Account.debt)
    if user_id is not None:
        sums = sums.where(LedgerEntry.user_id == user_id)
        held = held.where(_g.user_id == user_id)
        accounts = accounts.where(Account.user_id == user_id)
    sums_sq = sums.subquery()
    held_sq = held.subquery()
    accounts_sq = accounts.subquery()
    ledger_sum = func.coalesce(sums_sq.c.total, 0)
    grants_balance = func.coalesce(held_sq.c.remaining, 0) - accounts_sq.c.debt
    rows = session.execute(
        select(
            accounts_sq.c.user_id,
            accounts_sq.c.tokens_balance,
            ledger_sum,
            grants_balance,
            func.coalesce(held_sq.c.bad, 0),
        )
        .select_from(
            accounts_sq.outerjoin(sums_sq, sums_sq.c.user_id == accounts_sq.c.user_id).outerjoin(
                held_sq, held_sq.c.user_id == accounts_sq.c.user_id
            )
        )
        .where(
            or_(
                accounts_sq.c.tokens_balance != ledger_sum,
                accounts_sq.c.tokens_balance != grants_balance,
                func.coalesce(held_sq.c.bad, 0) > 0,
            )
        )
        .order_by(accounts_sq.c.user_id)
        .limit(MAX_MISMATCHES_LISTED)
    ).all()
    checked = session.execute(select(func.count()).select_from(accounts_sq)).scalar_one()
    bad = _bad_grants(session, [u for u, *_, n in rows if n], user_id)
    return ReconcileOut(
        checked=int(checked),
        mismatches=[
            Mismatch(
                user_id=u,
                balance=b,
                ledger_sum=int(s),
                grants_balance=int(gb),
                bad_grants=bad.get(u, []),
            )
            for u, b, s, gb, _ in rows
        ],
    )


def _bad_grants(session: Session, users: list[str], user_id: str | None) -> dict[str, list[str]]:
    if not users:
        return {}
    joined, sound = _grants_ok(user_id)
    rows = session.execute(
        select(_g.user_id, _g.id)
        .select_from(joined)
        .where(_g.user_id.in_(users), not_(sound))
        .order_by(_g.user_id, _g.id)
    )
    found: dict[str, list[str]] = {}
    for user, grant_id in rows:
        found.setdefault(user, []).append(str(grant_id))
    return found
