"""Spend limits (contract v1.2): ``tokens.set_limit``, ``tokens.limits``, and the limit a
request would break.

Every rule lives in SQL (sql/limits/): ``tokens_limit`` decides and counts inside each
movement's statement, under its pool's lock; ``tokens_limits`` lists the limits that apply to
an account with what each has used, and holds the one test of a limit; ``tokens_set_limit``
changes an account's limits under its pool's lock. Nothing here commits.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting.errors import LimitExceeded, user_not_found, validation_error
from models.schemas import LimitsOut, SpendLimitOut
from models.tables import Account

MAX_LIMITS = 8

_SET = text("SELECT * FROM tokens_set_limit(:user_id, :name, :max, :period, :rolling)")
_LIMITS = text(
    "SELECT l.listed FROM tokens_limits(:user_id, NULL) WITH ORDINALITY"
    " AS l(user_id, name, max_tokens, used, grain, lo, refuses, listed, n) ORDER BY l.n"
)
_REFUSING = text("SELECT tokens_limit_refusing(:user_id, :requested) AS refusing")


def set_limit(
    session: Session,
    user_id: str,
    name: str,
    max_tokens: int | None = None,
    period: str | None = None,
    rolling: bool = False,
) -> LimitsOut:
    """Cap what ``user_id`` and every account below it spend within one window of ``period``
    (``max_tokens=None`` removes the limit ``name``); the account's limits after."""
    if max_tokens is not None and period is None:
        raise validation_error("Invalid arguments: period: required to set a limit")
    row = session.execute(
        _SET,
        {
            "user_id": user_id,
            "name": name,
            "max": max_tokens,
            "period": period,
            "rolling": rolling,
        },
    ).one()
    if row.status == "not_found":
        raise user_not_found()
    if row.status == "too_many":
        raise validation_error(f"Invalid arguments: name: at most {MAX_LIMITS} limits per account")
    return LimitsOut(user_id=user_id, limits=[limit_out(x) for x in row.limits])


def limits(session: Session, user_id: str) -> LimitsOut:
    """Every limit that applies to ``user_id``: its own, then each account's above it, up to
    the pool, each account's by name, with what each has used in its current window."""
    if session.get(Account, user_id) is None:
        raise user_not_found()
    rows = session.execute(_LIMITS, {"user_id": user_id}).scalars().all()
    return LimitsOut(user_id=user_id, limits=[limit_out(x) for x in rows])


def refusing(session: Session, user_id: str, requested: int) -> SpendLimitOut | None:
    """The first limit (in ``tokens.limits`` order) that a spend of ``requested`` by
    ``user_id`` would take past ``max_tokens`` now, or None."""
    row = session.execute(_REFUSING, {"user_id": user_id, "requested": requested}).one()
    return None if row.refusing is None else limit_out(row.refusing)


# Every limit's use now, per account with limits (its own, read by tokens_limits with those
# above it); the cost follows the accounts that have limits.
_NEAR = text(
    "SELECT x.listed->>'period' AS period,"
    " count(*) FILTER (WHERE x.used * 10 >= x.max_tokens * 9) AS near,"
    " count(*) FILTER (WHERE x.used >= x.max_tokens) AS reached"
    " FROM (SELECT DISTINCT l.user_id FROM spend_limits l) a"
    " CROSS JOIN LATERAL tokens_limits(a.user_id, NULL) x"
    " WHERE x.user_id = a.user_id GROUP BY 1"
)


def near(session: Session) -> dict[str, tuple[int, int]]:
    """By period: how many limits have used 90 % or more of ``max_tokens`` now, and how many
    all of it (the metrics' near-limit gauges: five periods, whatever the number of limits)."""
    return {row.period: (int(row.near), int(row.reached)) for row in session.execute(_NEAR)}


_REFUSED = text("SELECT tokens_limit_refused(:spender, :owner, :name)")


def note_refused(session: Session, refused: LimitExceeded) -> None:
    """``limit.reached`` for a request the limit refused, once per window and limit
    (``tokens_limit_refused``), in ``session``'s transaction: after a single request's rolled
    back, or within a batch's. The limit is looked up from its own account, which lists it
    whoever below it made the request (a member's hold is its pool's, whose listing would not)."""
    limit = refused.fields["limit"]
    owner = limit["user_id"]
    session.execute(_REFUSED, {"spender": owner, "owner": owner, "name": limit["name"]})


def limit_out(listed: dict[str, Any]) -> SpendLimitOut:
    return SpendLimitOut.model_validate(listed)
