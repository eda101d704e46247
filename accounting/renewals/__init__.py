"""Renewals: each tier's allocation every ``period_days``, counted in whole UTC days.

- :mod:`accounting.renewals.rule`: when a user is due, each tier's plan, the guard;
- :mod:`accounting.renewals.statements`: pages of due users, and the one statement that renews
  a set of locked users (the renewal's one definition);
- :mod:`accounting.renewals.one`: one user (``check_eligibility``, ``renew_user``) and ``due``;
- :mod:`accounting.renewals.sweeps`: the sweep (plan, chunks, totals).
"""

from accounting.renewals.one import check_eligibility, due, renew_user
from accounting.renewals.rule import next_renewal_date, plans_at
from accounting.renewals.sweeps import (
    LastSweep,
    SweepPlan,
    dry_run_totals,
    last_sweep,
    new_sweep_id,
    plan_sweep,
    run_chunk,
    sweep,
    sweep_totals,
)

__all__ = [
    "LastSweep",
    "SweepPlan",
    "check_eligibility",
    "dry_run_totals",
    "due",
    "last_sweep",
    "new_sweep_id",
    "next_renewal_date",
    "plan_sweep",
    "plans_at",
    "renew_user",
    "run_chunk",
    "sweep",
    "sweep_totals",
]
