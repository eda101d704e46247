"""One user's renewal (``check_eligibility``, ``renew_user``) and the due users in sweep order
(``due``). They work in the caller's session and never commit; ``renew_user`` runs the sweep's
renewal statement on the one locked user.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    text,
)
from sqlalchemy.orm import Session

from accounting import idempotency, statements
from accounting.accounts import load_account
from accounting.catalog import tier_of
from accounting.config import rules
from accounting.errors import member_account, not_due, subscription_expired
from accounting.events import note_balance_change, note_renewals
from accounting.renewals.rule import (
    KIND,
    TierPlan,
    instant,
    lapsed,
    next_renewal_date,
    plans_at,
)
from accounting.renewals.statements import ONE_SQL, Key, Phase, due_page, last_key, statement_params
from models.schemas import (
    DueOut,
    EligibilityOut,
    RenewOut,
)
from models.tables import Account

# --- one user ---------------------------------------------------------------------------------


def check_eligibility(
    session: Session, user_id: str, now: datetime | None = None
) -> EligibilityOut:
    now = instant(session, now)
    return _verdict(_not_member(load_account(session, user_id)), now)


def _not_member(account: Account) -> Account:
    """Renewals are a pool's: a member (contract v1.2) is never due, and MEMBER_ACCOUNT."""
    if account.pool_id is not None:
        raise member_account(account.pool_id)
    return account


def _verdict(account: Account, now: datetime) -> EligibilityOut:
    last = account.last_renewal_at
    next_date = None if last is None else next_renewal_date(last, tier_of(account.tier).period_days)
    days = 0 if next_date is None else max(0, (next_date.date() - now.date()).days)
    if lapsed(account.tier, account.subscription_expires_at, now):
        eligible, reason = False, subscription_expired().message
    elif last is None:
        eligible, reason = True, "Never renewed"
    elif days == 0:
        eligible, reason = True, "Renewal due"
    else:
        eligible, reason = False, not_due(days).message
    return EligibilityOut(
        user_id=account.user_id,
        eligible=eligible,
        reason=reason,
        next_renewal_date=next_date,
        days_until_renewal=days,
    )


def renew_user(
    session: Session,
    user_id: str,
    now: datetime | None = None,
    idempotency_key: str | None = None,
) -> RenewOut:
    """Renew one user if due; refusals: USER_NOT_FOUND, SUBSCRIPTION_EXPIRED, NOT_DUE.

    With ``idempotency_key`` (the task id), a request already done returns its first result;
    a refusal rolls back with the caller's transaction, so it does not use up the key.
    """
    _not_member(load_account(session, user_id))  # raises USER_NOT_FOUND, MEMBER_ACCOUNT
    digest = idempotency.request_hash("renew_user")
    stored = idempotency.claim(session, user_id, idempotency_key, digest)
    if stored is not None:
        return RenewOut(**stored)
    now = instant(session, now)
    out = renew_one(session, user_id, plans_at(now), now, source="renew_user")
    if out is not None:
        idempotency.record(session, user_id, idempotency_key, out.model_dump(mode="json"))
        note_renewals(session, renewed={out.tier: 1}, tokens={out.tier: out.tokens_added})
        return out
    account = load_account(session, user_id)  # raises USER_NOT_FOUND
    if lapsed(account.tier, account.subscription_expires_at, now):
        raise subscription_expired()
    raise not_due(_verdict(account, now).days_until_renewal)


def renew_one(
    session: Session, user_id: str, plans: dict[str, TierPlan], now: datetime, source: str
) -> RenewOut | None:
    """One user renewed through tokens_renew (:data:`ONE_SQL`), which expires their due grants
    first; None when not due, or unknown: the caller tells which."""
    params = statement_params(plans, now) | {"user_id": user_id, "source": source}
    row = session.execute(text(ONE_SQL), params).first()
    if row is None:
        return None
    reserved = int(row.reserved)
    statements.note_expiries(session, user_id, reserved, row.expired_tokens, row.expired_balances)
    note_balance_change(
        session, user_id=user_id, balance=row.balance, tokens_reserved=reserved, operation=KIND
    )
    return RenewOut(
        user_id=user_id,
        tier=row.tier,
        tokens_added=row.allocation,
        previous_balance=row.balance - row.allocation - row.rolled + row.expired,
        new_balance=row.balance,
        renewal_date=now,
        tokens_expired=row.expired,
        tokens_rolled_over=row.rolled,
    )


def due(
    session: Session, tier: str | None = None, limit: int | None = None, now: datetime | None = None
) -> DueOut:
    """Due users in sweep order: never renewed first, then the oldest renewal."""
    now = instant(session, now)
    plans = plans_at(now, tier)
    chunk = rules().sweep_chunk_size
    user_ids: list[str] = []
    for phase in Phase if plans else ():
        after = Key()
        while limit is None or len(user_ids) < limit:
            n = chunk if limit is None else min(chunk, limit - len(user_ids))
            page = due_page(session, plans, phase, after, n, now)
            user_ids.extend(u for u, _ in page)
            if len(page) < n:
                break
            after = last_key(page, phase, after)
    return DueOut(user_ids=user_ids)
