"""The renewal rule: when a user is due (in whole UTC days, so a daily sweep never drifts), each
tier's plan at an instant, and the guard every renewing statement carries.

A user is due when ``utc_date(now) >= utc_date(last_renewal_at) + period_days`` (or was never
renewed), i.e. when ``last_renewal_at < cutoff`` with ``cutoff = utc_midnight(now) - (period - 1)
days``; so a user renewed at 02:00:05 by one daily sweep is due again at the sweep 30 days later at
02:00:01, and the schedule never drifts. Paid tiers (all but ``FREE_TIERS``) are not due once
``subscription_expires_at`` has passed.

Two instants, both from the database's clock (``accounting.clock``), never a worker's:

- ``now``, the eligibility instant, read once per decision (per sweep, per ``renew_user``). It is
  what ``last_renewal_at`` and ``renewal_date`` hold: the period a renewal belongs to. A sweep
  that runs past midnight therefore never pushes its last users' next renewal a day later.
- the write time: the account's ``updated_at`` is set to ``GREATEST(clock_timestamp(),
  updated_at)`` under the row lock, and the renewal entry takes its ``created_at`` from it, so a
  user's entries in ``created_at`` order are the order they were applied.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from sqlalchemy.orm import Session

from accounting import clock, grants
from accounting.catalog import FREE_TIERS, tier_of
from accounting.config import rules

log = logging.getLogger(__name__)

KIND = "renewal"
OPERATION = "monthly_reset"
# Allowances and rollovers share one priority.
PRIORITY = grants.DEFAULT_PRIORITY["allowance"]
assert grants.DEFAULT_PRIORITY["rollover"] == PRIORITY
MAX_ERRORS_LISTED = 100
MAX_ERROR_LENGTH = 500
# Sweep plans and tallies are kept this long (a redelivered message is minutes old, not days).
SWEEP_RETENTION = timedelta(days=7)
# Under the reset policy, allowance and rollover grants end this long after the next renewal
# date, so they end even if no renewal comes (a lapsed subscription).
RESET_GRACE = timedelta(days=1)


# --- the rule ---------------------------------------------------------------------------------


def utc_midnight(moment: datetime) -> datetime:
    return datetime.combine(moment.astimezone(UTC).date(), time(), tzinfo=UTC)


def next_renewal_date(last_renewal_at: datetime, period_days: int) -> datetime:
    """UTC midnight of the first day the user is due again."""
    return utc_midnight(last_renewal_at) + timedelta(days=period_days)


def renewal_cutoff(now: datetime, period_days: int) -> datetime:
    """Due iff ``last_renewal_at < cutoff`` (or never renewed): the whole-UTC-day rule as one
    comparison the database can index."""
    return utc_midnight(now) - timedelta(days=period_days - 1)


@dataclass(frozen=True)
class TierPlan:
    """What a sweep at ``now`` does to users of one tier.

    ``renewal`` is the tier's policy (``add`` or ``reset``); under ``reset`` the allowance and
    rollover grants a renewal at ``now`` makes end at ``ends`` (the next renewal date + 1 day)
    and at most ``rollover_max`` of the previous allowance rolls over.
    """

    name: str
    allocation: int
    cutoff: datetime
    paid: bool
    renewal: str = "add"
    rollover_max: int = 0
    ends: datetime | None = None

    @property
    def resets(self) -> bool:
        return self.renewal == "reset"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "allocation": self.allocation,
            "cutoff": self.cutoff.isoformat(),
            "paid": self.paid,
            "renewal": self.renewal,
            "rollover_max": self.rollover_max,
            "ends": None if self.ends is None else self.ends.isoformat(),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TierPlan:
        # Plans stored before v1.1 carry no policy: "add".
        ends = data.get("ends")
        return cls(
            name=data["name"],
            allocation=data["allocation"],
            cutoff=datetime.fromisoformat(data["cutoff"]),
            paid=data["paid"],
            renewal=data.get("renewal", "add"),
            rollover_max=data.get("rollover_max", 0),
            ends=None if ends is None else datetime.fromisoformat(ends),
        )


def plans_at(now: datetime, tier: str | None = None) -> dict[str, TierPlan]:
    """The plan of every configured tier (or of ``tier`` only; unknown: VALIDATION_ERROR)."""
    tiers = rules().tiers
    names = list(tiers) if tier is None else [tier]
    plans = {}
    for name in names:
        config = tier_of(name)
        resets = config.renewal == "reset"
        plans[name] = TierPlan(
            name=name,
            allocation=config.tokens,
            cutoff=renewal_cutoff(now, config.period_days),
            paid=name not in FREE_TIERS,
            renewal=config.renewal,
            rollover_max=config.rollover_max if resets else 0,
            ends=next_renewal_date(now, config.period_days) + RESET_GRACE if resets else None,
        )
    return plans


def lapsed(tier: str, subscription_expires_at: datetime | None, now: datetime) -> bool:
    return (
        tier not in FREE_TIERS
        and subscription_expires_at is not None
        and subscription_expires_at <= now
    )


def instant(session: Session, now: datetime | None) -> datetime:
    """The eligibility instant: the database's clock, unless a caller simulates time."""
    return (now or clock.db_now(session)).astimezone(UTC)
