"""The beat schedule: what ``celery -A worker beat`` sends, and when (all times UTC).

- ``renewals.sweep`` daily at ``TOKENS_RENEWAL_CRON`` (default ``0 2 * * *``);
- ``reservations.expire`` every ``TOKENS_RESERVATION_EXPIRY_SECONDS`` (default 60);
- ``grants.expire`` every minute (contract v1.1);
- ``ledger.reconcile`` daily at ``TOKENS_RECONCILE_CRON`` (default ``30 3 * * *``);
- ``idempotency.prune`` daily at ``TOKENS_IDEMPOTENCY_PRUNE_CRON`` (default ``45 3 * * *``);
- ``events.prune`` hourly: events past ``TOKENS_EVENTS_RETENTION_DAYS`` that every push channel
  delivered (contract v1.2);
- ``ledger.verify`` daily at ``TOKENS_VERIFY_CRON`` (default ``15 4 * * *``, contract v1.2);
- ``ledger.make_months`` daily at 00:20: the ledger's monthly partitions, three months ahead.

worker/config.py installs it as ``beat_schedule``; with a Redis broker RedBeat keeps it in Redis
and only the beat holding its lock sends, so several beat processes may run.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from celery.schedules import crontab

from worker.settings import Settings

SWEEP = "renewals-sweep"
EXPIRE_RESERVATIONS = "reservations-expire"
RECONCILE = "ledger-reconcile"
VERIFY = "ledger-verify"
PRUNE_IDEMPOTENCY = "idempotency-prune"
EXPIRE_GRANTS = "grants-expire"
PRUNE_EVENTS = "events-prune"
MAKE_MONTHS = "ledger-make-months"
GRANT_EXPIRY_SECONDS = 60


def cron(expression: str) -> crontab:
    """A five-field cron expression (minute hour day-of-month month day-of-week)."""
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"cron expression {expression!r} must have 5 fields, not {len(fields)}")
    minute, hour, day_of_month, month_of_year, day_of_week = fields
    return crontab(
        minute=minute,
        hour=hour,
        day_of_month=day_of_month,
        month_of_year=month_of_year,
        day_of_week=day_of_week,
    )


def beat_schedule(settings: Settings) -> dict[str, dict[str, Any]]:
    expiry = settings.reservation_expiry_seconds
    return {
        SWEEP: {"task": "renewals.sweep", "schedule": cron(settings.renewal_cron)},
        EXPIRE_RESERVATIONS: {
            "task": "reservations.expire",
            "schedule": timedelta(seconds=expiry),
            # Runs that piled up while no worker was consuming are worthless: the next one
            # releases everything due anyway.
            "options": {"expires": expiry},
        },
        EXPIRE_GRANTS: {
            "task": "grants.expire",
            "schedule": timedelta(seconds=GRANT_EXPIRY_SECONDS),
            # As for reservations: the next run writes everything due anyway.
            "options": {"expires": GRANT_EXPIRY_SECONDS},
        },
        RECONCILE: {"task": "ledger.reconcile", "schedule": cron(settings.reconcile_cron)},
        VERIFY: {"task": "ledger.verify", "schedule": cron(settings.verify_cron)},
        PRUNE_IDEMPOTENCY: {
            "task": "idempotency.prune",
            "schedule": cron(settings.idempotency_prune_cron),
        },
        # Runs that piled up are worthless: the next one makes every month missing.
        MAKE_MONTHS: {
            "task": "ledger.make_months",
            "schedule": cron("20 0 * * *"),
            "options": {"expires": 3600},
        },
        # A missed run is worthless: the next one deletes everything due anyway.
        PRUNE_EVENTS: {
            "task": "events.prune",
            "schedule": cron("7 * * * *"),
            "options": {"expires": 3600},
        },
    }
