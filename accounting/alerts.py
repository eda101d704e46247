"""``tokens.set_alerts`` and ``tokens.set_auto_topup``: an account's thresholds and automatic
top-up. The crossings and the requests themselves are decided in the database at the commit of
each change (``sql/events/tokens_alerts.sql``)."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting.errors import member_account, user_not_found
from token_worker_client.events import AlertsOut, AutoTopup

_SET = text(
    "SELECT status, thresholds, topup, pool FROM tokens_set_alerts("
    "CAST(:user AS text), CAST(:thresholds AS bigint[]), :set_topup, CAST(:below AS bigint),"
    " CAST(:amount AS bigint), CAST(:max AS integer))"
)


def _set(
    session: Session,
    user_id: str,
    thresholds: list[int] | None,
    topup: tuple[int | None, int | None, int | None] | None,
) -> AlertsOut:
    below, amount, per_month = topup or (None, None, None)
    row = session.execute(
        _SET,
        {
            "user": user_id,
            "thresholds": thresholds,
            "set_topup": topup is not None,
            "below": below,
            "amount": amount,
            "max": per_month,
        },
    ).one()
    if row.status == "not_found":
        raise user_not_found()
    if row.status == "member":
        raise member_account(row.pool)
    return AlertsOut(
        user_id=user_id,
        thresholds=list(row.thresholds),
        auto_topup=AutoTopup(**row.topup) if row.topup is not None else None,
    )


def set_alerts(session: Session, user_id: str, thresholds: list[int]) -> AlertsOut:
    """Up to 4 thresholds of ``tokens_available`` (``[]``: none)."""
    return _set(session, user_id, thresholds, None)


def set_auto_topup(
    session: Session,
    user_id: str,
    below: int | None,
    amount: int | None,
    max_per_month: int | None = None,
) -> AlertsOut:
    """Request ``amount`` whenever a change leaves ``tokens_available`` below ``below``
    (``None``: off)."""
    return _set(session, user_id, None, (below, amount, max_per_month))
