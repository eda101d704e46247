"""Renewals. They run on their own queue (worker/config.py routes ``renewals.*``), so a long
sweep never delays debits.

``renewals.sweep`` fans out: it plans the sweep (stored under its own task id) and replaces
itself with a chord of ``renewals.sweep_chunk`` tasks, which any worker serving the queue runs,
and ``renewals.sweep_totals``, which inherits the sweep's task id and so answers whoever waits on
the sweep with the contract's totals. Every one of them stays under the global time limit, below
the visibility timeout, however many users are due.
"""

from __future__ import annotations

from typing import Any

from celery import chord, group
from sqlalchemy.orm import Session

from accounting import renewals
from models.schemas import (
    DueIn,
    DueOut,
    EligibilityOut,
    RenewOut,
    SweepChunkIn,
    SweepChunkOut,
    SweepIn,
    SweepOut,
    SweepPlanned,
    SweepTotalsIn,
    UserIn,
)
from tasks.base import ContractTask, contract_task
from worker.celery import app
from worker.db import session_factory


@contract_task("renewals.check_eligibility", UserIn)
def check_eligibility(session: Session, p: UserIn, _task_id: str | None) -> EligibilityOut:
    return renewals.check_eligibility(session, p.user_id)


@contract_task("renewals.renew_user", UserIn)
def renew_user(session: Session, p: UserIn, task_id: str | None) -> RenewOut:
    # The task id is the idempotency key: a redelivered message replays its first result.
    return renewals.renew_user(session, p.user_id, idempotency_key=task_id)


def _plan(session: Session, p: SweepIn, task_id: str | None) -> SweepOut | SweepPlanned:
    if p.dry_run:
        return renewals.dry_run_totals(session, tier=p.tier, limit=p.limit)
    plan = renewals.plan_sweep(
        session,
        task_id or renewals.new_sweep_id(),
        tier=p.tier,
        limit=p.limit,
        continue_on_error=p.continue_on_error,
    )
    if plan.chunks == 0:
        return SweepOut(total_processed=0, successful=0, failed=0, skipped=0, errors=[])
    return SweepPlanned(sweep_id=plan.sweep_id, chunks=plan.chunks)


@app.task(name="renewals.sweep", bind=True, base=ContractTask)  # type: ignore[untyped-decorator]
def sweep(self: ContractTask, *args: Any, **kwargs: Any) -> dict[str, Any]:
    def fan_out(outcome: dict[str, Any]) -> dict[str, Any]:
        if "chunks" not in outcome:
            return outcome  # a dry run, nothing due, or a refusal: this task's own result
        sweep_id, chunks = outcome["sweep_id"], outcome["chunks"]
        # Ids derived from the sweep's: a redelivered sweep republishes the very same chunks and
        # group, and a chunk that already ran replays its stored tally.
        header = group(
            [
                sweep_chunk.si(sweep_id=sweep_id, index=i).set(task_id=f"{sweep_id}:{i}")
                for i in range(chunks)
            ],
            task_id=f"{sweep_id}:chunks",
        )
        # The callback is frozen with this task's id, so the sweep's result is the totals;
        # replace raises Ignore, so this task reports no outcome of its own.
        return self.replace(chord(header, sweep_totals.si(sweep_id=sweep_id)))  # type: ignore[no-any-return]

    # Planned and committed first (in _plan's transaction), published after.
    return self.execute(SweepIn, _plan, args, kwargs, then=fan_out)


@contract_task("renewals.sweep_chunk", SweepChunkIn)
def sweep_chunk(_session: Session, p: SweepChunkIn, _task_id: str | None) -> SweepChunkOut:
    # A chunk commits twice (its renewals, then the rows it had to wait for), so it takes
    # sessions of its own; the task's session stays unused (and so never opens a connection).
    return renewals.run_chunk(session_factory(), p.sweep_id, p.index)


@contract_task("renewals.sweep_totals", SweepTotalsIn)
def sweep_totals(session: Session, p: SweepTotalsIn, _task_id: str | None) -> SweepOut:
    return renewals.sweep_totals(session, p.sweep_id)


@contract_task("renewals.due", DueIn)
def due(session: Session, p: DueIn, _task_id: str | None) -> DueOut:
    return renewals.due(session, tier=p.tier, limit=p.limit)
