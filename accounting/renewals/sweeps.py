"""The renewal sweep fans out. ``plan_sweep`` fixes a sweep once (its instant, the tiers'
cutoffs, and chunks: keyset ranges over the due users in sweep order, one small page query per
chunk); each chunk (``run_chunk``) is one transaction that renews its range and writes its tally
beside it, so chunks may run anywhere, in any order, and more than once; ``sweep_totals`` sums the
tallies. ``sweep`` runs the same three steps in-process (the operator CLI, tests).
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    case,
    delete,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from accounting import clock, statements
from accounting.config import rules
from accounting.events import balance_changed, note_balance_change, note_renewals
from accounting.idempotency import insert_ignoring_conflicts
from accounting.renewals.one import renew_one
from accounting.renewals.rule import (
    KIND,
    MAX_ERROR_LENGTH,
    MAX_ERRORS_LISTED,
    SWEEP_RETENTION,
    TierPlan,
    instant,
    plans_at,
)
from accounting.renewals.statements import (
    CONTESTED_SQL,
    Key,
    Phase,
    chunk_sql,
    due_page,
    next_range,
    statement_params,
)
from models.schemas import (
    SweepChunkOut,
    SweepError,
    SweepOut,
)
from models.tables import sweep_chunk_table, sweep_table

log = logging.getLogger(__name__)

# --- planning a sweep -------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """A chunk: the due users of ``phase`` after ``after`` up to ``upto`` (inclusive), of which
    there were ``planned`` when the sweep was planned."""

    phase: Phase
    after: Key
    upto: Key
    planned: int


def _ranges(
    session: Session,
    plans: dict[str, TierPlan],
    now: datetime,
    limit: int | None,
    chunk_size: int,
) -> Iterator[Range]:
    """The sweep's chunks in sweep order, covering the first ``limit`` due users, found with one
    page query per chunk (never more than a chunk's worth of rows in memory)."""
    total = 0
    for phase in Phase if plans else ():
        after = Key()
        while limit is None or total < limit:
            n = chunk_size if limit is None else min(chunk_size, limit - total)
            count, last = next_range(session, plans, phase, after, n, now)
            if count:
                yield Range(phase, after, last, count)
                total += count
            if count < n:
                break
            after = last


def new_sweep_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class SweepPlan:
    sweep_id: str
    as_of: datetime
    chunks: int
    planned: int


def dry_run_totals(
    session: Session,
    *,
    tier: str | None = None,
    limit: int | None = None,
    now: datetime | None = None,
    chunk_size: int | None = None,
) -> SweepOut:
    """What the same sweep would return now, changing nothing: every due user counts as renewed."""
    now = instant(session, now)
    plans = plans_at(now, tier)
    chunk = chunk_size or rules().sweep_chunk_size
    due_users = sum(r.planned for r in _ranges(session, plans, now, limit, chunk))
    return SweepOut(total_processed=due_users, successful=due_users, failed=0, skipped=0, errors=[])


_sweeps = sweep_table.c
_chunks = sweep_chunk_table.c


def plan_sweep(
    session: Session,
    sweep_id: str,
    *,
    tier: str | None = None,
    limit: int | None = None,
    continue_on_error: bool = True,
    now: datetime | None = None,
    chunk_size: int | None = None,
) -> SweepPlan:
    """Fix sweep ``sweep_id`` in the caller's transaction: its instant, its tiers' cutoffs and
    its chunks. Planned before (a redelivered sweep message): the stored plan, unchanged.

    Also deletes the plans and tallies of sweeps older than ``SWEEP_RETENTION``.
    """
    db_now = clock.db_now(session)
    session.execute(delete(sweep_table).where(_sweeps.created_at < db_now - SWEEP_RETENTION))
    now = (now or db_now).astimezone(UTC)
    plans = plans_at(now, tier)
    # The claim: a concurrent duplicate blocks here until this plan commits, then reads it.
    claimed = session.execute(
        insert_ignoring_conflicts(sweep_table).returning(_sweeps.sweep_id),
        {
            "sweep_id": sweep_id,
            "as_of": now,
            "tiers": [p.to_json() for p in plans.values()],
            "continue_on_error": continue_on_error,
            "chunks": 0,
            "stopped": False,
            "created_at": db_now,
        },
    ).first()
    if claimed is None:
        stored = session.execute(
            select(_sweeps.as_of, _sweeps.chunks).where(_sweeps.sweep_id == sweep_id)
        ).one()
        total = session.execute(
            select(func.coalesce(func.sum(_chunks.planned), 0)).where(_chunks.sweep_id == sweep_id)
        ).scalar_one()
        return SweepPlan(sweep_id, stored.as_of, stored.chunks, int(total))
    chunk = chunk_size or rules().sweep_chunk_size
    rows: list[dict[str, Any]] = []
    count = planned = 0

    def flush() -> None:
        if rows:
            session.execute(insert(sweep_chunk_table), rows)
            rows.clear()

    for r in _ranges(session, plans, now, limit, chunk):
        rows.append(
            {
                "sweep_id": sweep_id,
                "chunk_index": count,
                "phase": r.phase.value,
                "after_user": r.after.user_id,
                "after_time": r.after.renewed_at,
                "upto_user": r.upto.user_id,
                "upto_time": r.upto.renewed_at,
                "planned": r.planned,
                "status": "planned",
                "successful": 0,
                "skipped": 0,
                "failed": 0,
                "errors": [],
                "contested": None,
            }
        )
        count += 1
        planned += r.planned
        if len(rows) >= 1000:
            flush()
    flush()
    session.execute(update(sweep_table).where(_sweeps.sweep_id == sweep_id).values(chunks=count))
    log.info(
        "renewal sweep %s planned: %d due users in %d chunks (as of %s)",
        sweep_id,
        planned,
        count,
        now.isoformat(),
    )
    return SweepPlan(sweep_id, now, count, planned)


# --- running a chunk --------------------------------------------------------------------------


@dataclass
class _Tally:
    successful: int = 0
    failed: int = 0
    skipped: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)
    stopped: bool = False
    by_tier: Counter[str] = field(default_factory=Counter)  # the successful ones, per tier

    def fail(self, user_id: str, exc: BaseException) -> None:
        self.failed += 1
        if len(self.errors) < MAX_ERRORS_LISTED:
            self.errors.append({"user_id": user_id, "error": _describe(exc)})


def _describe(exc: BaseException) -> str:
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    lines = str(cause).strip().splitlines()
    return (lines[0] if lines else type(cause).__name__)[:MAX_ERROR_LENGTH]


def _isolatable(exc: DBAPIError) -> bool:
    """An error some user's data may have caused (a constraint, a trigger's RAISE, which
    psycopg reports as a ProgrammingError), not the connection or a deadlock: those propagate,
    so the task is retried as a whole."""
    return not (exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError))


@dataclass(frozen=True)
class _Chunk:
    """A chunk row as read under its lock, with what its sweep fixed."""

    sweep_id: str
    index: int
    range: Range
    status: str
    successful: int
    skipped: int
    failed: int
    contested: list[str]
    as_of: datetime
    plans: dict[str, TierPlan]
    continue_on_error: bool
    stopped: bool

    def out(self) -> SweepChunkOut:
        return SweepChunkOut(
            sweep_id=self.sweep_id,
            index=self.index,
            status=self.status,
            successful=self.successful,
            skipped=self.skipped,
            failed=self.failed,
        )


def _lock_chunk(session: Session, sweep_id: str, index: int) -> _Chunk | None:
    """The chunk row, locked: a duplicate of this chunk waits here, then replays its tally."""
    row = session.execute(
        select(
            sweep_chunk_table,
            _sweeps.as_of,
            _sweeps.tiers,
            _sweeps.continue_on_error,
            _sweeps.stopped,
        )
        .join(sweep_table, _sweeps.sweep_id == _chunks.sweep_id)
        .where(_chunks.sweep_id == sweep_id, _chunks.chunk_index == index)
        .with_for_update(of=sweep_chunk_table)
    ).first()
    if row is None:
        return None
    plans = {p["name"]: TierPlan.from_json(p) for p in row.tiers}
    return _Chunk(
        sweep_id=sweep_id,
        index=index,
        range=Range(
            Phase(row.phase),
            Key(row.after_user, row.after_time),
            Key(row.upto_user, row.upto_time),
            row.planned,
        ),
        status=row.status,
        successful=row.successful,
        skipped=row.skipped,
        failed=row.failed,
        contested=list(row.contested or []),
        as_of=row.as_of,
        plans=plans,
        continue_on_error=row.continue_on_error,
        stopped=row.stopped,
    )


def _write_tally(
    session: Session, chunk: _Chunk, status: str, tally: _Tally, contested: list[str]
) -> SweepChunkOut:
    """Store the chunk's tally (added to what it held) in the transaction that renewed it."""
    values: dict[str, Any] = {
        "status": status,
        "successful": chunk.successful + tally.successful,
        "skipped": chunk.skipped + tally.skipped,
        "failed": chunk.failed + tally.failed,
        "contested": contested or None,
    }
    if tally.errors:
        errors = session.execute(
            select(_chunks.errors).where(
                _chunks.sweep_id == chunk.sweep_id, _chunks.chunk_index == chunk.index
            )
        ).scalar_one()
        values["errors"] = (list(errors or []) + tally.errors)[:MAX_ERRORS_LISTED]
    session.execute(
        update(sweep_chunk_table)
        .where(_chunks.sweep_id == chunk.sweep_id, _chunks.chunk_index == chunk.index)
        .values(**values)
    )
    if tally.stopped:
        session.execute(
            update(sweep_table).where(_sweeps.sweep_id == chunk.sweep_id).values(stopped=True)
        )
    note_renewals(
        session,
        renewed=dict(tally.by_tier),
        tokens={t: n * chunk.plans[t].allocation for t, n in tally.by_tier.items()},
        skipped=tally.skipped,
        failed=tally.failed,
        tier=next(iter(chunk.plans)) if len(chunk.plans) == 1 else None,
    )
    return SweepChunkOut(
        sweep_id=chunk.sweep_id,
        index=chunk.index,
        status=status,
        successful=values["successful"],
        skipped=values["skipped"],
        failed=values["failed"],
    )


def run_chunk(sessions: Callable[[], Session], sweep_id: str, index: int) -> SweepChunkOut:
    """Renew chunk ``index`` of a planned sweep, once: run again, it returns its stored tally.

    One transaction renews the chunk's range and writes its tally. Rows others hold are
    skipped and listed in the tally; they are waited for after that commit (waiting while
    holding the chunk's locks could deadlock with the holder), in a second transaction that
    completes the tally. A chunk that fails on some user's data (a constraint, a trigger) is
    redone user by user to isolate the failure; connection trouble and deadlocks propagate,
    and the task is retried. If the sweep has stopped (``continue_on_error=False`` and an
    error), a chunk that has not started does nothing.
    """
    out: SweepChunkOut | None = None
    contested: list[str] = []
    try:
        with sessions() as session, session.begin():
            chunk = _lock_chunk(session, sweep_id, index)
            if chunk is None:
                return _missing(sweep_id, index)
            if chunk.status == "planned":
                out, contested = _renew_chunk(session, chunk)
            else:
                out, contested = chunk.out(), chunk.contested
    except DBAPIError as exc:
        if not _isolatable(exc):
            raise
        log.warning(
            "renewal sweep %s chunk %d failed (%s); renewing it user by user",
            sweep_id,
            index,
            _describe(exc),
        )
        with sessions() as session, session.begin():
            chunk = _lock_chunk(session, sweep_id, index)
            if chunk is None:
                return _missing(sweep_id, index)
            if chunk.status == "planned":
                out = _renew_chunk_one_by_one(session, chunk)
            else:
                out, contested = chunk.out(), chunk.contested
    if out.status == "contested":
        out = _finish_contested(sessions, sweep_id, index, contested)
    log.info(
        "renewal sweep %s chunk %d: %s, %d renewed, %d skipped, %d failed",
        sweep_id,
        index,
        out.status,
        out.successful,
        out.skipped,
        out.failed,
    )
    return out


def _missing(sweep_id: str, index: int) -> SweepChunkOut:
    log.warning(
        "renewal sweep %s chunk %d: no such chunk (expired?); nothing done", sweep_id, index
    )
    return SweepChunkOut(
        sweep_id=sweep_id, index=index, status="missing", successful=0, skipped=0, failed=0
    )


def _renew_chunk(session: Session, chunk: _Chunk) -> tuple[SweepChunkOut, list[str]]:
    if chunk.stopped:
        return _write_tally(session, chunk, "stopped", _Tally(), []), []
    r, plans, now = chunk.range, chunk.plans, chunk.as_of
    params = statement_params(plans, now, r.after, r.planned, r.upto) | {
        "with_changes": balance_changed.has_listeners()
    }
    row = session.execute(text(chunk_sql(r.phase, plans)), params).one()
    _note(session, row)
    by_tier, contested = Counter(row.by_tier or {}), list(row.contested or [])
    renewed = by_tier.total()
    # Due at planning but not renewed now (renewed meanwhile, or no longer due): skipped.
    tally = _Tally(
        successful=renewed, skipped=r.planned - renewed - len(contested), by_tier=by_tier
    )
    status = "contested" if contested else "done"
    return _write_tally(session, chunk, status, tally, contested), contested


def _renew_chunk_one_by_one(session: Session, chunk: _Chunk) -> SweepChunkOut:
    if chunk.stopped:
        return _write_tally(session, chunk, "stopped", _Tally(), [])
    r = chunk.range
    page = due_page(session, chunk.plans, r.phase, r.after, r.planned, chunk.as_of, r.upto)
    tally = _Tally()
    _one_by_one(session, [u for u, _ in page], chunk, tally)
    if not tally.stopped:
        tally.skipped += r.planned - len(page)
    return _write_tally(session, chunk, "done", tally, [])


def _finish_contested(
    sessions: Callable[[], Session], sweep_id: str, index: int, contested: list[str]
) -> SweepChunkOut:
    """Wait for the rows others held, then renew those still due; completes the tally."""
    try:
        with sessions() as session, session.begin():
            chunk = _lock_chunk(session, sweep_id, index)
            if chunk is None:
                return _missing(sweep_id, index)
            if chunk.status != "contested":
                return chunk.out()
            by_tier = _renew_contested(session, chunk.plans, chunk.contested, chunk.as_of)
            renewed = by_tier.total()
            tally = _Tally(
                successful=renewed, skipped=len(chunk.contested) - renewed, by_tier=by_tier
            )
            return _write_tally(session, chunk, "done", tally, [])
    except DBAPIError as exc:
        if not _isolatable(exc):
            raise
    with sessions() as session, session.begin():
        chunk = _lock_chunk(session, sweep_id, index)
        if chunk is None:
            return _missing(sweep_id, index)
        if chunk.status != "contested":
            return chunk.out()
        tally = _Tally()
        _one_by_one(session, chunk.contested, chunk, tally)
        return _write_tally(session, chunk, "done", tally, [])


def _renew_contested(
    session: Session, plans: dict[str, TierPlan], contested: list[str], now: datetime
) -> Counter[str]:
    """Users renewed, per tier."""
    params = statement_params(plans, now) | {
        "contested": contested,
        "with_changes": balance_changed.has_listeners(),
    }
    row = session.execute(text(CONTESTED_SQL), params).one()
    _note(session, row)
    return Counter(row.by_tier or {})


def _note(session: Session, row: Any) -> None:
    """The events of a chunk's renewals: due grants' expiries first, as they were written."""
    for user_id, reserved, tokens, balances in row.expiries or []:
        statements.note_expiries(session, user_id, int(reserved), tokens, balances)
    for user_id, balance, reserved in row.changes or []:
        note_balance_change(
            session, user_id=user_id, balance=balance, tokens_reserved=reserved, operation=KIND
        )


def _one_by_one(session: Session, user_ids: list[str], chunk: _Chunk, tally: _Tally) -> None:
    """The slow path for a chunk that failed: each user in a savepoint, failures recorded.
    With ``continue_on_error=False`` the first failure stops the chunk (and, through the
    tally, the sweep)."""
    for user_id in user_ids:
        try:
            with session.begin_nested():
                out = renew_one(session, user_id, chunk.plans, chunk.as_of, source="sweep")
        except DBAPIError as exc:
            if not _isolatable(exc):
                raise
            log.error(
                "renewal sweep %s: user %r failed: %s", chunk.sweep_id, user_id, _describe(exc)
            )
            tally.fail(user_id, exc)
            if not chunk.continue_on_error:
                tally.stopped = True
                return
            continue
        if out is None:
            tally.skipped += 1
        else:
            tally.successful += 1
            tally.by_tier[out.tier] += 1


# --- totals, and the whole sweep in-process ---------------------------------------------------


def sweep_totals(session: Session, sweep_id: str) -> SweepOut:
    """The sweep's result, summed from its chunks' stored tallies (so a chunk that ran twice
    counts once); errors in chunk order, at most ``MAX_ERRORS_LISTED``."""
    successful, skipped, failed = session.execute(
        select(
            *(
                func.coalesce(func.sum(c), 0)
                for c in (_chunks.successful, _chunks.skipped, _chunks.failed)
            )
        ).where(_chunks.sweep_id == sweep_id)
    ).one()
    errors: list[SweepError] = []
    if failed:
        listed = session.execute(
            select(_chunks.errors)
            .where(_chunks.sweep_id == sweep_id, _chunks.failed > 0)
            .order_by(_chunks.chunk_index)
        ).scalars()
        for chunk_errors in listed:
            errors.extend(SweepError(**e) for e in chunk_errors or [])
            if len(errors) >= MAX_ERRORS_LISTED:
                break
    successful, skipped, failed = int(successful or 0), int(skipped or 0), int(failed or 0)
    return SweepOut(
        total_processed=successful + skipped + failed,
        successful=successful,
        failed=failed,
        skipped=skipped,
        errors=errors[:MAX_ERRORS_LISTED],
    )


@dataclass(frozen=True)
class LastSweep:
    """The latest sweep planned, and its chunks' tallies so far."""

    planned_at: datetime
    chunks: int
    pending: int  # chunks not yet run (0: the sweep is complete)
    successful: int
    skipped: int
    failed: int


def last_sweep(session: Session) -> LastSweep | None:
    """The latest sweep (planned by ``renewals.sweep`` or the CLI; dry runs are not recorded),
    or None if none is kept. Two index look-ups: the newest sweep, then its chunks."""
    latest = (
        select(_sweeps.sweep_id, _sweeps.created_at, _sweeps.chunks)
        .order_by(_sweeps.created_at.desc())
        .limit(1)
        .subquery()
    )
    pending = case((_chunks.status.in_(("planned", "contested")), 1), else_=0)
    row = session.execute(
        select(
            latest.c.created_at,
            latest.c.chunks,
            *(
                func.coalesce(func.sum(c), 0)
                for c in (pending, _chunks.successful, _chunks.skipped, _chunks.failed)
            ),
        )
        .select_from(latest.outerjoin(sweep_chunk_table, _chunks.sweep_id == latest.c.sweep_id))
        .group_by(latest.c.sweep_id, latest.c.created_at, latest.c.chunks)
    ).first()
    if row is None:
        return None
    planned_at, chunks, waiting, successful, skipped, failed = row
    return LastSweep(
        planned_at=planned_at,
        chunks=int(chunks),
        pending=int(waiting),
        successful=int(successful),
        skipped=int(skipped),
        failed=int(failed),
    )


def sweep(
    sessions: Callable[[], Session],
    *,
    tier: str | None = None,
    limit: int | None = None,
    dry_run: bool = False,
    continue_on_error: bool = True,
    now: datetime | None = None,
    chunk_size: int | None = None,
    sweep_id: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SweepOut:
    """Renew every due user (of ``tier``), at most ``limit``, due longest first, in this
    process: plan, run each chunk in order, sum. ``sessions()`` must give a fresh session each
    time (one transaction per chunk, bounded memory). The task ``renewals.sweep`` runs the same
    steps with its chunks spread over the workers. ``progress(users, planned)`` is called once
    the sweep is planned (0 users) and after each chunk commits (the users it covered)."""
    if dry_run:
        with sessions() as session:
            return dry_run_totals(session, tier=tier, limit=limit, now=now, chunk_size=chunk_size)
    sweep_id = sweep_id or new_sweep_id()
    with sessions() as session, session.begin():
        plan = plan_sweep(
            session,
            sweep_id,
            tier=tier,
            limit=limit,
            continue_on_error=continue_on_error,
            now=now,
            chunk_size=chunk_size,
        )
    if progress is not None:
        progress(0, plan.planned)
    for index in range(plan.chunks):
        chunk = run_chunk(sessions, sweep_id, index)
        if progress is not None:
            progress(chunk.successful + chunk.skipped + chunk.failed, plan.planned)
    with sessions() as session:
        return sweep_totals(session, sweep_id)
