"""What one renewal does to one user's grants, under the user's account lock (contract v1.1).

Under the ``reset`` policy the renewal first ends the user's previous ``allowance`` and
``rollover`` grants: what is left of them (less what reservations hold) leaves through one
``expiry`` entry, which also makes a ``rollover`` grant of ``min(left of the allowances,
rollover_max)`` (it does not pay debt: those tokens were already in the balance, and it never
rolls again). Then, under either policy, the ``monthly_reset`` entry grants the new allowance,
which pays the user's debt first. The PostgreSQL sweep does the same set-based
(``accounting.renewals``); this is the per-user path (``renew_user``, SQLite, isolation).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, case, insert, select, update
from sqlalchemy.orm import Session

from accounting import grants
from accounting.grants import ACTIVE, EXPIRED, EXPIRY, Change, Locked
from models.tables import UTCDateTime, grant_table

ALLOWANCE, ROLLOVER = "allowance", "rollover"
# Allowances and rollovers share one priority (the PostgreSQL sweep writes both with it).
PRIORITY = grants.DEFAULT_PRIORITY[ALLOWANCE]
assert grants.DEFAULT_PRIORITY[ROLLOVER] == PRIORITY

_g = grant_table.c
_now = bindparam("now", type_=UTCDateTime())


@dataclass(frozen=True)
class Renewed:
    before: int  # the balance before the renewal's entries
    after: Locked
    expired: int
    rolled: int


def renew_grants(
    session: Session,
    locked: Locked,
    *,
    allocation: int,
    resets: bool,
    rollover_max: int,
    ends: datetime | None,
    kind: str,
    operation_type: str,
    metadata: dict[str, Any],
) -> Renewed:
    """Write the renewal's entries for a locked user whose due grants are already expired
    (``grants.lock_current``); returns the balance before, the account after and the tokens
    expired and rolled over."""
    before = locked.balance
    expired = rolled = 0
    if resets:
        locked, expired, rolled = _reset(session, locked, rollover_max, ends)
    change = Change(locked)
    if allocation:
        change.grant(session, ALLOWANCE, allocation, priority=PRIORITY, expires_at=ends)
    _, after = grants.write(
        session, change, kind=kind, operation_type=operation_type, metadata=metadata, event=kind
    )
    return Renewed(before, after, expired, rolled)


def _reset(
    session: Session, locked: Locked, rollover_max: int, ends: datetime | None
) -> tuple[Locked, int, int]:
    rows = session.execute(
        select(_g.id, _g.kind, _g.remaining, _g.held)
        .where(
            _g.user_id == locked.user_id,
            _g.status == ACTIVE,
            _g.kind.in_((ALLOWANCE, ROLLOVER)),
        )
        .order_by(_g.id)
    ).all()
    if not rows:
        return locked, 0, 0
    now = locked.now
    # Every previous grant ends now (or when it ended already): what is left leaves, what
    # reservations hold expires once they release it.
    session.execute(
        update(grant_table)
        .where(_g.id == bindparam("gid"))
        .values(
            remaining=_g.held,
            expired=_g.expired + _g.remaining - _g.held,
            status=bindparam("status"),
            ended_at=bindparam("ended_at"),
            expires_at=case((_g.expires_at < _now, _g.expires_at), else_=_now),
        ),
        [
            {
                "gid": gid,
                "status": EXPIRED if held == 0 else ACTIVE,
                "ended_at": now if held == 0 else None,
                "now": now,
            }
            for gid, _, _, held in rows
        ],
    )
    splits = [(int(gid), -int(rem - held)) for gid, _, rem, held in rows if rem > held]
    if not splits:
        return locked, 0, 0
    expired = -sum(amount for _, amount in splits)
    base = sum(int(rem - held) for _, kind, rem, held in rows if kind == ALLOWANCE)
    rolled = min(base, rollover_max)
    change = Change(locked, list(splits))
    if rolled:
        change.splits.append((_rollover(session, locked, rolled, ends), rolled))
    _, after = grants.write(
        session,
        change,
        kind=EXPIRY,
        operation_type=EXPIRY,
        metadata={
            "grant_id": str(splits[0][0]),
            "grant_ids": [str(gid) for gid, _ in splits],
            "reason": "renewal",
        },
    )
    return after, expired, rolled


def _rollover(session: Session, locked: Locked, amount: int, ends: datetime | None) -> int:
    """A rollover grant of tokens already in the balance: it pays no debt."""
    grant_id = session.execute(
        insert(grant_table).returning(_g.id),
        {
            "user_id": locked.user_id,
            "kind": ROLLOVER,
            "amount": amount,
            "remaining": amount,
            "held": 0,
            "spent": 0,
            "expired": 0,
            "returned": 0,
            "priority": PRIORITY,
            "expires_at": ends,
            "status": ACTIVE,
            "created_at": locked.now,
            "ended_at": None,
        },
    ).scalar_one()
    return int(grant_id)
