"""accounting/renewals.py over a real PostgreSQL session."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from accounting import accounts, clock, movements, renewals
from accounting.errors import DomainError
from accounting.renewals import sweeps as renewal_sweeps
from models.schemas import SweepOut
from models.tables import LedgerEntry
from tests.polling import wait_for
from tests.support import assert_ledger_consistent, refused
from worker.db import get_engine, session_factory
from worker.signals import balance_changed, renewals_counted

NOW = datetime(2026, 11, 24, 2, 0, 1, tzinfo=UTC)
ALLOCATION = {"Gift": 100, "Professional": 2000, "Business": 10000}


def at(day: int, clock: str = "00:00:00", base: datetime = NOW) -> datetime:
    """``day`` UTC days after (negative: before) ``base``'s date, at ``clock``."""
    hours, minutes, seconds = clock.split(":")
    midnight = datetime.combine(base.date(), datetime.min.time(), tzinfo=UTC)
    return midnight + timedelta(
        days=day, hours=int(hours), minutes=int(minutes), seconds=float(seconds)
    )


def open_(
    session: Session,
    user_id: str,
    tier: str = "Gift",
    last: datetime | None = None,
    expires: datetime | None = None,
    balance: int = 0,
) -> None:
    accounts.open_account(
        session,
        user_id,
        tier=tier,
        initial_balance=balance,
        subscription_expires_at=expires,
        last_renewal_at=last,
    )


def renewal_entries(session: Session, user_id: str | None = None) -> list[LedgerEntry]:
    stmt = select(LedgerEntry).where(LedgerEntry.kind == "renewal").order_by(LedgerEntry.id)
    if user_id is not None:
        stmt = stmt.where(LedgerEntry.user_id == user_id)
    return list(session.scalars(stmt))


def renewed_users(session: Session) -> list[str]:
    return sorted({e.user_id for e in renewal_entries(session)})


def sweep(**kw: Any) -> SweepOut:
    return renewals.sweep(session_factory(), **({"now": NOW} | kw))


def snapshot(session: Session) -> list[list[tuple[Any, ...]]]:
    return [
        [tuple(r) for r in session.execute(text(f"SELECT * FROM {t} ORDER BY 1"))]
        for t in ("accounts", "ledger_entries")
    ]


# --- the rule: every path agrees ------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    tier: str
    last: datetime | None
    expires: datetime | None
    now: datetime
    eligible: bool
    reason: str
    days: int
    next_date: datetime | None


def due_case(name: str, last: datetime, now: datetime, tier: str = "Gift") -> Case:
    return Case(name, tier, last, None, now, True, "Renewal due", 0, at(30, base=last))


def waiting_case(name: str, last: datetime, now: datetime, days: int) -> Case:
    reason = f"Next renewal in {days} days"
    return Case(name, "Gift", last, None, now, False, reason, days, at(30, base=last))


D0 = datetime(2026, 10, 1, tzinfo=UTC)
CASES = [
    Case("never renewed", "Gift", None, None, NOW, True, "Never renewed", 0, None),
    due_case("30 days, sweep-to-sweep", at(0, "02:00:05", D0), at(30, "02:00:01", D0)),
    due_case("30 days, 23:59 to 00:01", at(0, "23:59:00", D0), at(30, "00:01:00", D0)),
    due_case("30 days, 00:00 to 23:59", at(0, "00:00:00", D0), at(30, "23:59:59", D0)),
    due_case("30 days, last microsecond", at(0, "23:59:59.999999", D0), at(30, "00:00:00", D0)),
    due_case("45 days", at(0, "12:00:00", D0), at(45, "01:00:00", D0)),
    waiting_case("29 days, 00:01 to 23:59", at(0, "00:01:00", D0), at(29, "23:59:00", D0), 1),
    waiting_case("29 days, 23:59 to 23:59", at(0, "23:59:00", D0), at(29, "23:59:59", D0), 1),
    waiting_case("renewed today", at(0, "02:00:05", D0), at(0, "02:00:06", D0), 30),
    waiting_case("renewed 10 days ago", at(0, "02:00:05", D0), at(10, "00:00:00", D0), 20),
    Case(
        "expired paid subscription",
        "Professional",
        at(-40),
        NOW - timedelta(seconds=1),
        NOW,
        False,
        "Subscription expired",
        0,
        at(-10),
    ),
    Case(
        "paid subscription expiring this instant",
        "Business",
        None,
        NOW,
        NOW,
        False,
        "Subscription expired",
        0,
        None,
    ),
    Case(
        "active paid subscription",
        "Business",
        at(-40),
        NOW + timedelta(days=1),
        NOW,
        True,
        "Renewal due",
        0,
        at(-10),
    ),
    Case("paid tier, no expiry", "Professional", at(-30), None, NOW, True, "Renewal due", 0, at(0)),
    Case(
        "Gift ignores an expiry",
        "Gift",
        at(-31),
        NOW - timedelta(days=10),
        NOW,
        True,
        "Renewal due",
        0,
        at(-1),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_eligibility_rule_is_the_same_for_every_path(session: Session, case: Case) -> None:
    """check_eligibility, due, a dry run, the sweep and renew_user agree on each rule."""
    open_(session, "u", case.tier, case.last, case.expires)
    open_(session, "v", case.tier, case.last, case.expires)
    session.commit()

    verdict = renewals.check_eligibility(session, "u", now=case.now)
    assert verdict.model_dump() == {
        "success": True,
        "user_id": "u",
        "eligible": case.eligible,
        "reason": case.reason,
        "next_renewal_date": case.next_date,
        "days_until_renewal": case.days,
    }
    expected = ["u", "v"] if case.eligible else []
    assert renewals.due(session, now=case.now).user_ids == expected
    assert sweep(now=case.now, dry_run=True).successful == len(expected)

    out = sweep(now=case.now, tier=case.tier, limit=1)
    assert (out.successful, out.failed, out.skipped) == (len(expected[:1]), 0, 0)
    session.expire_all()
    assert renewed_users(session) == expected[:1]

    if case.eligible:
        renewed = renewals.renew_user(session, "v", now=case.now)
        assert (renewed.tokens_added, renewed.new_balance) == (ALLOCATION[case.tier],) * 2
    else:
        code = "SUBSCRIPTION_EXPIRED" if case.reason == "Subscription expired" else "NOT_DUE"
        err = refused(session, renewals.renew_user, "v", now=case.now)
        assert (err.code, err.message) == (code, case.reason)


def test_no_drift_a_daily_sweep_renews_every_30_days(session: Session) -> None:
    """Renewed at 02:00:05, the user is due at the sweep 30 days later at 02:00:01 (a 24-hour
    rule would slip a day every period)."""
    open_(session, "u")
    session.commit()
    day0 = at(0, "02:00:05", D0)
    assert sweep(now=day0).successful == 1
    renewal_days = []
    anchors = [accounts.get_balance(session, "u").last_renewal_at]
    for day in range(1, 121):
        if sweep(now=at(day, "02:00:01", D0)).successful:
            renewal_days.append(day)
            session.expire_all()
            anchors.append(accounts.get_balance(session, "u").last_renewal_at)
    assert renewal_days == [30, 60, 90, 120]
    # last_renewal_at is the sweep's instant (the period the renewal belongs to); the entries'
    # created_at is when each was written, in the order they were applied.
    assert anchors == [day0, *(at(d, "02:00:01", D0) for d in (30, 60, 90, 120))]
    session.expire_all()
    created = [e.created_at for e in renewal_entries(session)]
    assert created == sorted(created) and len(created) == 5


# --- renew_user -------------------------------------------------------------------------------


def test_renew_user_adds_the_allocation_with_its_ledger_entry(session: Session) -> None:
    open_(session, "pro", "Professional", last=at(-31), balance=15)
    session.commit()
    started = clock.db_now(session)
    out = renewals.renew_user(session, "pro", now=NOW)
    session.commit()
    assert out.model_dump() == {
        "success": True,
        "user_id": "pro",
        "tier": "Professional",
        "tokens_added": 2000,
        "previous_balance": 15,
        "new_balance": 2015,
        "renewal_date": NOW,
        "tokens_expired": 0,
        "tokens_rolled_over": 0,
    }
    (entry,) = renewal_entries(session, "pro")
    assert (entry.operation_type, entry.tokens_amount, entry.balance_before) == (
        "monthly_reset",
        2000,
        15,
    )
    assert (entry.balance_after, entry.meta) == (
        2015,
        {"tier": "Professional", "source": "renew_user"},
    )
    # Written at the database's time, not the simulated instant (which last_renewal_at holds).
    assert started <= entry.created_at <= clock.db_now(session)
    account = accounts.get_balance(session, "pro")
    assert (account.tokens_balance, account.last_renewal_at) == (2015, NOW)
    assert_ledger_consistent(session)


def test_renew_user_refusals_change_nothing(session: Session) -> None:
    open_(session, "u", last=at(-31))
    open_(session, "gone", "Business", last=at(-31), expires=at(-1))
    session.commit()
    renewals.renew_user(session, "u", now=NOW)
    session.commit()
    before = snapshot(session)
    for user_id, code, message in [
        ("u", "NOT_DUE", "Next renewal in 30 days"),
        ("gone", "SUBSCRIPTION_EXPIRED", "Subscription expired"),
        ("nobody", "USER_NOT_FOUND", "User not found"),
    ]:
        err = refused(session, renewals.renew_user, user_id, now=NOW)
        assert (err.code, err.message) == (code, message)
    err = refused(session, renewals.check_eligibility, "nobody")
    assert err.code == "USER_NOT_FOUND"
    assert snapshot(session) == before


def test_concurrent_renew_user_calls_renew_once(session: Session) -> None:
    """Ten transactions race for one due user: the guard in the UPDATE lets one through."""
    open_(session, "u", "Business", last=at(-40))
    session.commit()
    engine = create_engine(get_engine().url, pool_size=10, max_overflow=0)
    barrier = threading.Barrier(10)

    def attempt(_: int) -> str:
        with Session(engine) as s:
            barrier.wait(timeout=30)
            try:
                renewals.renew_user(s, "u", now=NOW)
            except DomainError as exc:
                s.rollback()
                return exc.code
            s.commit()
            return "renewed"

    try:
        outcomes = run_threads(10, attempt)
    finally:
        engine.dispose()
    assert sorted(outcomes) == ["NOT_DUE"] * 9 + ["renewed"]
    session.expire_all()
    assert len(renewal_entries(session, "u")) == 1
    assert accounts.get_balance(session, "u").tokens_balance == 10000


def run_threads(count: int, work: Callable[[int], str]) -> list[str]:
    results: list[str] = [""] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


# --- due and the sweep ------------------------------------------------------------------------


def seed_mixed(session: Session) -> list[str]:
    """Due and not-due users of every tier; returns the due ones in sweep order."""
    open_(session, "n2")  # never renewed: first, by user_id
    open_(session, "n1", "Business")
    open_(session, "old-b", "Professional", last=at(-90, "05:00:00"))
    open_(session, "old-a", last=at(-90, "05:00:00"))  # same instant: by user_id
    open_(session, "mid", "Business", last=at(-45, "23:00:00"), expires=at(30))
    open_(session, "edge", last=at(-30, "23:59:59"))
    open_(session, "recent", last=at(-29))  # not due
    open_(session, "expired", "Professional", last=at(-60), expires=at(-1))  # not due
    open_(session, "x-never-expired", "Business", expires=at(-5))  # not due
    session.commit()
    return ["n1", "n2", "old-a", "old-b", "mid", "edge"]


@pytest.mark.parametrize("chunk_size", [1, 2, 5000])
def test_sweep_renews_each_due_user_once_in_order(session: Session, chunk_size: int) -> None:
    order = seed_mixed(session)
    assert renewals.due(session, now=NOW).user_ids == order
    started = clock.db_now(session)
    session.commit()
    out = sweep(chunk_size=chunk_size)
    assert out.model_dump() == {
        "success": True,
        "total_processed": 6,
        "successful": 6,
        "failed": 0,
        "skipped": 0,
        "errors": [],
    }
    session.expire_all()
    assert renewed_users(session) == sorted(order)
    for entry in renewal_entries(session):
        tier = accounts.get_balance(session, entry.user_id).tier
        assert (entry.operation_type, entry.tokens_amount) == ("monthly_reset", ALLOCATION[tier])
        assert entry.meta == {"tier": tier, "source": "sweep"}
        assert started <= entry.created_at <= clock.db_now(session)
        assert accounts.get_balance(session, entry.user_id).last_renewal_at == NOW
    assert renewals.due(session, now=NOW).user_ids == []
    assert sweep(chunk_size=chunk_size).total_processed == 0
    assert_ledger_consistent(session)


def test_sweep_reports_progress_once_planned_and_after_each_chunk(session: Session) -> None:
    seed_mixed(session)
    calls: list[tuple[int, int]] = []
    assert sweep(chunk_size=4, progress=lambda done, planned: calls.append((done, planned)))
    # The two never renewed, then the four renewed before (a chunk never spans the two).
    assert calls == [(0, 6), (2, 6), (4, 6)]


def test_sweep_limit_renews_those_due_longest(session: Session) -> None:
    order = seed_mixed(session)
    assert renewals.due(session, now=NOW, limit=3).user_ids == order[:3]
    assert sweep(limit=3, chunk_size=2).successful == 3
    session.expire_all()
    assert renewed_users(session) == sorted(order[:3])
    assert renewals.due(session, now=NOW).user_ids == order[3:]


def test_sweep_tier_filter(session: Session) -> None:
    seed_mixed(session)
    assert renewals.due(session, tier="Business", now=NOW).user_ids == ["n1", "mid"]
    assert sweep(tier="Business").successful == 2
    session.expire_all()
    assert renewed_users(session) == ["mid", "n1"]
    err = refused(session, renewals.due, tier="Platinum")
    assert err.code == "VALIDATION_ERROR"
    with pytest.raises(DomainError) as raised:
        sweep(tier="Platinum")
    assert raised.value.code == "VALIDATION_ERROR"


def test_dry_run_changes_nothing_and_counts_what_the_sweep_does(session: Session) -> None:
    seed_mixed(session)
    before = snapshot(session)
    variants: list[dict[str, Any]] = [{}, {"limit": 4}, {"tier": "Gift"}]
    for kw in variants:
        dry = sweep(dry_run=True, chunk_size=2, **kw)
        assert snapshot(session) == before
        real = sweep(chunk_size=2, **kw)
        assert dry == real
        session.rollback()
        session.execute(text("TRUNCATE ledger_entries, accounts CASCADE"))
        session.commit()
        seed_mixed(session)
        before = snapshot(session)


@pytest.fixture
def poisoned(session: Session) -> Iterator[None]:
    """A trigger that makes the renewal entry of users named poison* fail in the database."""
    session.execute(
        text(
            """
            CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.user_id LIKE 'poison%' AND NEW.kind = 'renewal' THEN
                    RAISE EXCEPTION 'refusing to renew %', NEW.user_id;
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_poison BEFORE INSERT ON ledger_entries
                FOR EACH ROW EXECUTE FUNCTION refuse_poison();
            """
        )
    )
    session.commit()
    try:
        yield
    finally:
        session.rollback()
        session.execute(text("DROP TRIGGER refuse_poison ON ledger_entries"))
        session.execute(text("DROP FUNCTION refuse_poison()"))
        session.commit()


def seed_with_poison(session: Session) -> None:
    for i in range(7):
        open_(session, f"user-{i}", last=at(-40 + i))
    open_(session, "poison", last=at(-38, "12:00:00"))  # between user-2 and user-3
    session.commit()


def test_sweep_continues_past_an_error(session: Session, poisoned: None) -> None:
    seed_with_poison(session)
    out = sweep(chunk_size=3)
    assert (out.total_processed, out.successful, out.failed, out.skipped) == (8, 7, 1, 0)
    assert [e.model_dump() for e in out.errors] == [
        {"user_id": "poison", "error": "refusing to renew poison"}
    ]
    session.expire_all()
    assert renewed_users(session) == [f"user-{i}" for i in range(7)]
    assert accounts.get_balance(session, "poison").last_renewal_at == at(-38, "12:00:00")
    assert_ledger_consistent(session)


def test_sweep_stops_at_the_first_error(session: Session, poisoned: None) -> None:
    seed_with_poison(session)
    out = sweep(chunk_size=3, continue_on_error=False)
    assert (out.total_processed, out.successful, out.failed, out.skipped) == (4, 3, 1, 0)
    assert [e.user_id for e in out.errors] == ["poison"]
    session.expire_all()
    assert renewed_users(session) == ["user-0", "user-1", "user-2"]
    assert_ledger_consistent(session)


def test_sweep_lists_at_most_100_errors(session: Session, poisoned: None) -> None:
    session.execute(
        text(
            "INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved, tokens_spent,"
            " created_at, updated_at)"
            " SELECT 'poison-' || lpad(i::text, 3, '0'), 'Gift', 0, 0, 0, now(), now()"
            " FROM generate_series(1, 105) i"
        )
    )
    session.commit()
    out = sweep(chunk_size=50)
    assert (out.total_processed, out.failed, len(out.errors)) == (105, 105, 100)
    assert out.errors[0].user_id == "poison-001"


# --- concurrency: contested rows --------------------------------------------------------------


def waiting_on_a_lock() -> bool:
    # A fresh connection each time: pg_stat_activity is a snapshot for a whole transaction.
    with get_engine().connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


def sweep_in_thread(results: list[SweepOut]) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.append(sweep()))
    thread.start()
    return thread


def test_user_renewed_meanwhile_is_skipped_not_renewed_twice(session: Session) -> None:
    """A renew_user holds the row while the sweep reaches it: the sweep skips it (SKIP LOCKED),
    waits for it, then finds it no longer due. Without the guard it would renew it again."""
    for user_id in ("a", "b", "c"):
        open_(session, user_id, last=at(-40))
    session.commit()
    with Session(get_engine()) as holder:
        renewals.renew_user(holder, "b", now=NOW)  # uncommitted: "b" stays locked
        results: list[SweepOut] = []
        thread = sweep_in_thread(results)
        wait_for(waiting_on_a_lock, 10, "the sweep waiting for b")
        holder.commit()
    thread.join(30)
    assert [(r.successful, r.skipped, r.total_processed) for r in results] == [(2, 1, 3)]
    session.expire_all()
    assert [len(renewal_entries(session, u)) for u in ("a", "b", "c")] == [1, 1, 1]
    assert_ledger_consistent(session)


def test_user_held_by_a_debit_is_waited_for_not_missed(session: Session) -> None:
    for user_id in ("a", "b", "c"):
        open_(session, user_id, last=at(-40), balance=50)
    session.commit()
    with Session(get_engine()) as holder:
        movements.debit(holder, "b", 20, "image_generation")  # uncommitted: "b" stays locked
        results: list[SweepOut] = []
        thread = sweep_in_thread(results)
        wait_for(waiting_on_a_lock, 10, "the sweep waiting for b")
        holder.commit()
    thread.join(30)
    assert [(r.successful, r.skipped) for r in results] == [(3, 0)]
    session.expire_all()
    assert accounts.get_balance(session, "b").tokens_balance == 50 - 20 + 100
    assert_ledger_consistent(session)


def test_balance_changed_sent_for_each_renewal_after_commit(session: Session) -> None:
    order = seed_mixed(session)
    received: list[tuple[str, str, int]] = []

    def receiver(sender: Any, **kw: Any) -> None:
        received.append((kw["operation"], kw["user_id"], kw["balance"]))

    balance_changed.connect(receiver, weak=False)
    try:
        sweep(chunk_size=4)
    finally:
        balance_changed.disconnect(receiver)
    session.expire_all()
    assert sorted(received) == sorted(
        ("renewal", u, accounts.get_balance(session, u).tokens_balance) for u in order
    )


# --- time order: a user's entries in created_at order are the order they were applied ------------


def assert_chained_in_time_order(session: Session, user_id: str) -> None:
    """The contract's ledger order: by (created_at, id) each entry starts where the previous
    one ended (the first at 0)."""
    rows = session.execute(
        text(
            "SELECT id, kind, balance_before, balance_after, created_at FROM ledger_entries"
            " WHERE user_id = :u ORDER BY created_at, id"
        ),
        {"u": user_id},
    ).all()
    previous = 0
    for row in rows:
        assert row.balance_before == previous, f"{user_id}: not chained in time order: {rows}"
        previous = row.balance_after


def test_a_sweep_behind_the_clock_writes_its_renewal_after_an_earlier_debit(
    session: Session,
) -> None:
    """A worker whose clock is an hour behind sweeps after a debit: the renewal is applied
    after the debit, so it must come after it in created_at order too."""
    behind = datetime.now(UTC) - timedelta(hours=1)
    open_(session, "u", last=at(-40, base=behind), balance=50)
    session.commit()
    movements.debit(session, "u", 10, "image_generation")
    session.commit()
    assert sweep(now=behind).successful == 1
    session.expire_all()
    assert_chained_in_time_order(session, "u")
    assert accounts.get_balance(session, "u").tokens_balance == 140


def test_renew_user_behind_the_clock_writes_its_renewal_after_an_earlier_debit(
    session: Session,
) -> None:
    behind = datetime.now(UTC) - timedelta(hours=1)
    open_(session, "u", last=at(-40, base=behind), balance=50)
    session.commit()
    movements.debit(session, "u", 10, "image_generation")
    session.commit()
    renewals.renew_user(session, "u", now=behind)
    session.commit()
    session.expire_all()
    assert_chained_in_time_order(session, "u")


def test_a_debit_committed_while_the_sweep_waits_comes_before_the_renewal(
    session: Session,
) -> None:
    """The sweep has started (its cutoff is fixed) and waits for a row; meanwhile a debit on
    that row commits. The renewal is applied after the debit, so its entry must be later in
    created_at order: a reader paging by start_date would otherwise never see it."""
    last = datetime.now(UTC) - timedelta(days=40)
    for user_id in ("a", "b", "c"):
        open_(session, user_id, last=last, balance=50)
    session.commit()
    with Session(get_engine()) as holder:
        holder.execute(text("SELECT 1 FROM accounts WHERE user_id = 'b' FOR UPDATE"))
        results: list[SweepOut] = []
        thread = threading.Thread(target=lambda: results.append(renewals.sweep(session_factory())))
        thread.start()
        wait_for(waiting_on_a_lock, 10, "the sweep waiting for b")
        movements.debit(holder, "b", 20, "image_generation")
        holder.commit()
    thread.join(30)
    assert [(r.successful, r.skipped) for r in results] == [(3, 0)]
    session.expire_all()
    for user_id in ("a", "b", "c"):
        assert_chained_in_time_order(session, user_id)
    assert_ledger_consistent(session)


# --- the fan-out: planning, chunks, totals ----------------------------------------------------


def plan(session: Session, sweep_id: str = "s1", **kw: Any) -> renewals.SweepPlan:
    out = renewals.plan_sweep(session, sweep_id, **({"now": NOW} | kw))
    session.commit()
    return out


def chunk_rows(session: Session, sweep_id: str = "s1") -> list[tuple[Any, ...]]:
    return [
        tuple(r)
        for r in session.execute(
            text(
                "SELECT phase, after_user, upto_user, planned, status, successful, skipped, failed"
                " FROM sweep_chunks WHERE sweep_id = :s ORDER BY chunk_index"
            ),
            {"s": sweep_id},
        )
    ]


def run(sweep_id: str, index: int) -> tuple[str, int, int, int]:
    out = renewals.run_chunk(session_factory(), sweep_id, index)
    return out.status, out.successful, out.skipped, out.failed


def totals(session: Session, sweep_id: str = "s1") -> tuple[int, int, int, int]:
    session.rollback()
    out = renewals.sweep_totals(session, sweep_id)
    return out.total_processed, out.successful, out.skipped, out.failed


def test_plan_splits_the_due_users_into_keyset_ranges(session: Session) -> None:
    """Chunks of 2 in sweep order, each a range (after, upto] with its count; nothing renewed."""
    seed_mixed(session)
    before = snapshot(session)
    planned = plan(session, chunk_size=2)
    assert (planned.chunks, planned.planned, planned.as_of) == (3, 6, NOW)
    assert chunk_rows(session) == [
        ("never", "", "n2", 2, "planned", 0, 0, 0),
        ("lapsed", "", "old-b", 2, "planned", 0, 0, 0),
        ("lapsed", "old-b", "edge", 2, "planned", 0, 0, 0),
    ]
    assert snapshot(session) == before
    limited = plan(session, "s2", chunk_size=2, limit=3, tier=None)
    assert (limited.chunks, limited.planned) == (2, 3)
    assert chunk_rows(session, "s2")[-1] == ("lapsed", "", "old-a", 1, "planned", 0, 0, 0)
    business = plan(session, "s3", chunk_size=5, tier="Business")
    assert chunk_rows(session, "s3") == [
        ("never", "", "n1", 1, "planned", 0, 0, 0),
        ("lapsed", "", "mid", 1, "planned", 0, 0, 0),
    ]
    assert business.planned == 2


def test_a_sweep_planned_again_keeps_its_first_plan(session: Session) -> None:
    """A redelivered sweep message (same id) gets the stored plan, whatever is due by then."""
    seed_mixed(session)
    first = plan(session, chunk_size=2)
    renewals.renew_user(session, "n1", now=NOW)
    session.commit()
    again = plan(session, chunk_size=5, now=NOW + timedelta(days=3), tier="Gift")
    assert again == first
    assert len(chunk_rows(session)) == 3


def test_chunks_run_in_any_order_each_on_its_own_range(session: Session) -> None:
    order = seed_mixed(session)
    plan(session, chunk_size=2)
    assert [run("s1", i) for i in (2, 0, 1)] == [("done", 2, 0, 0)] * 3
    session.expire_all()
    assert renewed_users(session) == sorted(order)
    assert totals(session) == (6, 6, 0, 0)
    assert_ledger_consistent(session)


def test_a_redelivered_chunk_replays_its_tally_and_renews_nobody_twice(session: Session) -> None:
    seed_mixed(session)
    plan(session, chunk_size=2)
    assert run("s1", 1) == ("done", 2, 0, 0)
    entries = len(renewal_entries(session))
    assert run("s1", 1) == ("done", 2, 0, 0)
    session.expire_all()
    assert len(renewal_entries(session)) == entries == 2
    assert renewals.run_chunk(session_factory(), "no-such-sweep", 0).status == "missing"


def test_a_user_renewed_after_planning_counts_as_skipped(session: Session) -> None:
    seed_mixed(session)
    plan(session, chunk_size=2)
    renewals.renew_user(session, "old-b", now=NOW)
    session.commit()
    assert run("s1", 1) == ("done", 1, 1, 0)
    assert [run("s1", i) for i in (0, 2)] == [("done", 2, 0, 0)] * 2
    assert totals(session) == (6, 5, 1, 0)
    session.expire_all()
    assert len(renewal_entries(session, "old-b")) == 1


def test_a_chunk_cut_off_while_waiting_for_held_rows_finishes_them_when_redelivered(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk commits its renewals and the rows it could not lock; its worker dies before
    waiting for them. Delivered again, the chunk renews only those, once."""
    for user_id in ("a", "b", "c"):
        open_(session, user_id, last=at(-40))
    session.commit()
    plan(session)

    def crash(*_: Any) -> Any:
        raise SystemExit("worker lost")

    with Session(get_engine()) as holder:
        holder.execute(text("SELECT 1 FROM accounts WHERE user_id = 'b' FOR UPDATE"))
        with monkeypatch.context() as patched:
            patched.setattr(renewal_sweeps, "_finish_contested", crash)
            with pytest.raises(SystemExit):
                renewals.run_chunk(session_factory(), "s1", 0)
        assert chunk_rows(session)[0][4:] == ("contested", 2, 0, 0)
        holder.rollback()
    assert run("s1", 0) == ("done", 3, 0, 0)
    assert run("s1", 0) == ("done", 3, 0, 0)
    session.expire_all()
    assert [len(renewal_entries(session, u)) for u in ("a", "b", "c")] == [1, 1, 1]
    assert_ledger_consistent(session)


def test_stop_on_error_stops_chunks_that_start_later(session: Session, poisoned: None) -> None:
    """With continue_on_error=False the first error marks the sweep stopped: the chunk that hit
    it stops at that user, and chunks starting afterwards, whatever their place, do nothing."""
    seed_with_poison(session)
    plan(session, chunk_size=3, continue_on_error=False)
    assert run("s1", 1) == ("done", 0, 0, 1)  # poison comes first in chunk 1
    assert [run("s1", i) for i in (0, 2)] == [("stopped", 0, 0, 0)] * 2
    assert totals(session) == (1, 0, 0, 1)
    session.expire_all()
    assert renewed_users(session) == []
    errors = renewals.sweep_totals(session, "s1").errors
    assert [e.model_dump() for e in errors] == [
        {"user_id": "poison", "error": "refusing to renew poison"}
    ]


def test_old_sweep_plans_are_deleted_when_a_sweep_starts(session: Session) -> None:
    seed_mixed(session)
    plan(session, "old", chunk_size=2)
    plan(session, "recent", chunk_size=2)
    session.execute(
        text(
            "UPDATE sweeps SET created_at = created_at - CAST(:age AS interval) WHERE sweep_id = :s"
        ),
        [{"s": "old", "age": "8 days"}, {"s": "recent", "age": "6 days"}],
    )
    session.commit()
    plan(session, "new", chunk_size=2)
    kept = session.execute(text("SELECT sweep_id FROM sweeps ORDER BY 1")).scalars().all()
    assert kept == ["new", "recent"]
    assert session.execute(
        text("SELECT DISTINCT sweep_id FROM sweep_chunks ORDER BY 1")
    ).scalars().all() == ["new", "recent"]


def test_the_sweep_takes_its_instant_from_the_database_clock(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose clock is a day behind neither decides eligibility nor stamps entries."""
    from models import tables

    open_(session, "u", last=datetime.now(UTC) - timedelta(days=30))
    session.commit()
    behind = datetime.now(UTC) - timedelta(days=1)
    monkeypatch.setattr(tables, "utcnow", lambda: behind)
    started = clock.db_now(session)
    session.commit()
    out = renewals.sweep(session_factory())
    assert out.successful == 1  # due by the database's date, not yet by the worker's
    session.expire_all()
    (entry,) = renewal_entries(session, "u")
    assert entry.created_at >= started
    renewed_at = accounts.get_balance(session, "u").last_renewal_at
    assert renewed_at is not None and renewed_at >= started


# --- renewals_counted (metrics by tier) and the latest sweep ------------------------------------


@dataclass
class Counted:
    """Every ``renewals_counted`` sent, summed."""

    events: list[dict[str, Any]]

    def renewed(self) -> dict[str, int]:
        return _sum(e["renewed"] for e in self.events)

    def tokens(self) -> dict[str, int]:
        return _sum(e["tokens"] for e in self.events)

    def others(self) -> list[tuple[str | None, int, int]]:
        return [
            (e["tier"], e["skipped"], e["failed"])
            for e in self.events
            if e["skipped"] or e["failed"]
        ]


def _sum(maps: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for m in maps:
        for k, v in m.items():
            total[k] = total.get(k, 0) + v
    return total


@pytest.fixture
def counted() -> Iterator[Counted]:
    seen = Counted([])

    def receiver(sender: Any, **kw: Any) -> None:
        kw.pop("signal", None)
        seen.events.append(kw)

    renewals_counted.connect(receiver, weak=False)
    try:
        yield seen
    finally:
        renewals_counted.disconnect(receiver)


def test_renewals_are_counted_per_tier_once_committed(session: Session, counted: Counted) -> None:
    seed_mixed(session)  # due: n2, old-a, edge (Gift); old-b (Professional); n1, mid (Business)
    assert sweep(chunk_size=2).successful == 6
    assert counted.renewed() == {"Gift": 3, "Professional": 1, "Business": 2}
    assert counted.tokens() == {"Gift": 300, "Professional": 2000, "Business": 20000}
    assert counted.others() == []
    # A chunk run again replays its tally and counts nothing.
    sent = len(counted.events)
    with session_factory()() as s:
        sweep_id = s.execute(text("SELECT sweep_id FROM sweeps")).scalar_one()
    renewals.run_chunk(session_factory(), sweep_id, 0)
    assert len(counted.events) == sent


def test_renew_user_is_counted_once_and_never_for_a_replay_or_refusal(
    session: Session, counted: Counted
) -> None:
    open_(session, "p", "Professional")
    session.commit()
    for _ in range(2):  # the second replays the first result
        renewals.renew_user(session, "p", now=NOW, idempotency_key="t1")
        session.commit()
    refused(session, renewals.renew_user, "p", now=NOW)  # NOT_DUE, rolled back
    assert counted.events == [
        {"renewed": {"Professional": 1}, "tokens": {"Professional": 2000}, "skipped": 0,
         "failed": 0, "tier": None}
    ]  # fmt: skip


def test_skipped_and_failed_are_counted_under_the_sweeps_tier(
    session: Session, poisoned: None, counted: Counted
) -> None:
    seed_with_poison(session)  # chunks of 3: user-0..2 | poison, user-3, user-4 | user-5, user-6
    plan(session, tier="Gift", chunk_size=3)
    renewals.renew_user(session, "user-5", now=NOW)  # renewed after planning: skipped
    session.commit()
    counted.events.clear()
    assert [run("s1", i) for i in range(3)] == [
        ("done", 3, 0, 0),
        ("done", 2, 0, 1),  # failed on poison, redone user by user
        ("done", 1, 1, 0),
    ]
    assert counted.renewed() == {"Gift": 6}
    assert sorted(counted.others()) == [("Gift", 0, 1), ("Gift", 1, 0)]


def test_contested_rows_are_counted_when_renewed(session: Session, counted: Counted) -> None:
    for user_id, tier in (("a", "Gift"), ("b", "Business"), ("c", "Gift")):
        open_(session, user_id, tier, last=at(-40), balance=50)
    session.commit()
    with Session(get_engine()) as holder:
        movements.debit(holder, "b", 20, "image_generation")  # uncommitted: "b" stays locked
        results: list[SweepOut] = []
        thread = sweep_in_thread(results)
        wait_for(waiting_on_a_lock, 10, "the sweep waiting for b")
        holder.commit()
    thread.join(30)
    assert [r.successful for r in results] == [3]
    assert counted.renewed() == {"Gift": 2, "Business": 1}
    assert counted.others() == []


def test_last_sweep_reports_the_latest_sweep_and_its_progress(session: Session) -> None:
    assert renewals.last_sweep(session) is None
    seed_mixed(session)
    planned = plan(session, "s1", chunk_size=2)
    session.rollback()
    last = renewals.last_sweep(session)
    assert last is not None
    assert (last.chunks, last.pending, last.successful, last.skipped, last.failed) == (
        3,
        3,
        0,
        0,
        0,
    )
    assert last.planned_at.tzinfo is not None
    run("s1", 0)
    session.rollback()
    last = renewals.last_sweep(session)
    assert last is not None and (last.pending, last.successful) == (2, 2)
    assert planned.chunks == 3
    later = plan(session, "s2", chunk_size=2)  # nothing due any more but the rest of s1's users
    session.rollback()
    last = renewals.last_sweep(session)
    assert last is not None and (last.chunks, last.pending) == (later.chunks, later.chunks)
