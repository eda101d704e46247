"""Spend limits (contract v1.2): set and listed, checked and counted inside each movement under
its pool's lock, in calendar (UTC) and rolling windows.

Time is simulated the way every movement reads it: a movement's time is the database clock but
never earlier than its pool's last change (``accounts.updated_at``), so moving a pool's
``updated_at`` into the future moves that pool's clock there."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from accounting import accounts, batches, ledger, limits, movements, reservations
from accounting.errors import DomainError
from models.schemas import DebitIn
from tests.accounting.test_pools import tree as pools_tree
from tests.support import assert_ledger_consistent, attempt, refused, run_in_threads
from worker.db import session_scope

START = datetime(2031, 1, 5, 12, 0, tzinfo=UTC)  # a Sunday


def at(session: Session, when: datetime, pool: str = "pool") -> None:
    """Move ``pool``'s clock to ``when`` (forwards only, as a clock does)."""
    session.execute(
        text("UPDATE accounts SET updated_at = :t WHERE user_id = :p"), {"t": when, "p": pool}
    )
    session.commit()


def tree(session: Session) -> None:
    """pool (10,000 tokens) -> team -> alice, bob; pool -> carol; the pool's clock at START."""
    pools_tree(session, 10_000)
    at(session, START)


def used(session: Session, user_id: str) -> dict[str, int]:
    return {f"{x.user_id}/{x.name}": x.used for x in limits.limits(session, user_id).limits}


def debit(session: Session, user_id: str, amount: int, **kw: Any) -> Any:
    out = movements.debit(session, user_id, amount, "image_generation", **kw)
    session.commit()
    return out


def refusal(session: Session, user_id: str, amount: int, **kw: Any) -> DomainError:
    return refused(session, movements.debit, user_id, amount, "image_generation", **kw)


def test_limits_are_set_and_listed_in_the_contracts_order(session: Session) -> None:
    tree(session)
    out = limits.set_limit(session, "alice", "daily", 100, "day")
    limits.set_limit(session, "alice", "burst", 20, "minute", rolling=True)
    limits.set_limit(session, "team", "weekly", 500, "week")
    limits.set_limit(session, "pool", "monthly", 5000, "month")
    session.commit()
    assert out.user_id == "alice" and [x.name for x in out.limits] == ["daily"]
    listed = limits.limits(session, "alice").limits
    assert [(x.user_id, x.name) for x in listed] == [
        ("alice", "burst"),
        ("alice", "daily"),
        ("team", "weekly"),
        ("pool", "monthly"),
    ]
    daily = listed[1].model_dump()
    assert daily == {
        "user_id": "alice",
        "name": "daily",
        "max_tokens": 100,
        "period": "day",
        "rolling": False,
        "used": 0,
        "remaining": 100,
        "resets_at": datetime(2031, 1, 6, tzinfo=UTC),
    }
    assert listed[0].resets_at is None  # rolling, nothing counted
    assert listed[2].resets_at == datetime(2031, 1, 6, tzinfo=UTC)  # Monday
    assert listed[3].resets_at == datetime(2031, 2, 1, tzinfo=UTC)
    assert [x.name for x in limits.limits(session, "bob").limits] == ["weekly", "monthly"]
    assert [x.name for x in limits.limits(session, "carol").limits] == ["monthly"]
    # Removed with max_tokens None; replaced by name.
    limits.set_limit(session, "alice", "burst", None)
    limits.set_limit(session, "alice", "daily", 50, "day")
    session.commit()
    assert [(x.name, x.max_tokens) for x in limits.limits(session, "alice").limits][:1] == [
        ("daily", 50)
    ]
    assert refused(session, limits.limits, "ghost").code == "USER_NOT_FOUND"
    assert refused(session, limits.set_limit, "ghost", "x", 1, "day").code == "USER_NOT_FOUND"
    assert refused(session, limits.set_limit, "alice", "x", 1).code == "VALIDATION_ERROR"


def test_at_most_eight_limits_per_account(session: Session) -> None:
    tree(session)
    for i in range(8):
        limits.set_limit(session, "team", f"l{i}", 1000 + i, "hour")
    session.commit()
    refusal_ = refused(session, limits.set_limit, "team", "l8", 5, "hour")
    assert refusal_.code == "VALIDATION_ERROR" and "at most 8" in refusal_.message
    limits.set_limit(session, "team", "l0", 7, "day")  # an existing name is a change
    session.commit()


def test_a_debit_past_a_limit_is_refused_naming_the_first_limit_it_breaks(
    session: Session,
) -> None:
    tree(session)
    limits.set_limit(session, "alice", "daily", 100, "day")
    limits.set_limit(session, "team", "daily", 150, "day")
    limits.set_limit(session, "pool", "monthly", 1000, "month")
    session.commit()
    debit(session, "alice", 90)
    debit(session, "bob", 50)
    exc = refusal(session, "alice", 11, allow_overdraft=True)
    assert (exc.code, exc.message) == (
        "LIMIT_EXCEEDED",
        "Spend limit exceeded: daily on alice. Limit: 100, Used: 90, Requested: 11",
    )
    assert exc.fields["limit"]["user_id"] == "alice" and exc.fields["limit"]["used"] == 90
    # bob's own limits are fine; the team's is the first he breaks.
    exc = refusal(session, "bob", 11)
    assert (
        exc.message == "Spend limit exceeded: daily on team. Limit: 150, Used: 140, Requested: 11"
    )
    debit(session, "bob", 10)
    assert used(session, "alice") == {"alice/daily": 90, "team/daily": 150, "pool/monthly": 150}
    # Nothing changed by the refusals; INSUFFICIENT_TOKENS is decided first.
    assert accounts.get_balance(session, "pool").tokens_balance == 10_000 - 150
    assert refusal(session, "carol", 20_000).code == "INSUFFICIENT_TOKENS"
    limits.set_limit(session, "carol", "tiny", 1, "day")
    session.commit()
    assert refusal(session, "carol", 20_000).code == "INSUFFICIENT_TOKENS"
    assert refusal(session, "carol", 2).code == "LIMIT_EXCEEDED"
    assert_ledger_consistent(session)


def test_spends_made_before_a_limit_was_set_count(session: Session) -> None:
    tree(session)
    debit(session, "alice", 30)
    debit(session, "bob", 20)
    first = debit(session, "carol", 5)
    movements.refund(session, "carol", 5, original_entry_id=first.ledger_entry_id)
    session.commit()
    limits.set_limit(session, "pool", "daily", 100, "day")
    limits.set_limit(session, "team", "daily", 60, "day")
    session.commit()
    assert used(session, "alice") == {"team/daily": 50, "pool/daily": 50}
    assert refusal(session, "bob", 11).code == "LIMIT_EXCEEDED"


def test_calendar_days_weeks_and_months_turn_at_utc_midnight(session: Session) -> None:
    tree(session)
    limits.set_limit(session, "alice", "daily", 10, "day")
    limits.set_limit(session, "alice", "weekly", 25, "week")
    limits.set_limit(session, "pool", "monthly", 40, "month")
    session.commit()
    at(session, datetime(2031, 1, 5, 23, 59, 59, 999000, tzinfo=UTC))  # Sunday night
    debit(session, "alice", 10)
    assert refusal(session, "alice", 1).message.startswith("Spend limit exceeded: daily on alice")
    at(session, datetime(2031, 1, 6, tzinfo=UTC))  # Monday 00:00: a new day and a new week
    debit(session, "alice", 10)
    at(session, datetime(2031, 1, 7, 12, tzinfo=UTC))
    debit(session, "alice", 10)
    at(session, datetime(2031, 1, 8, 12, tzinfo=UTC))
    assert refusal(session, "alice", 6).message.startswith("Spend limit exceeded: weekly on alice")
    debit(session, "alice", 5)
    assert used(session, "alice")["alice/weekly"] == 25
    at(session, datetime(2031, 1, 31, 23, 59, 59, 999999, tzinfo=UTC))  # month end
    assert used(session, "alice")["pool/monthly"] == 35
    assert refusal(session, "carol", 6).message.startswith("Spend limit exceeded: monthly on pool")
    debit(session, "carol", 5)
    at(session, datetime(2031, 2, 1, tzinfo=UTC))
    assert used(session, "alice") == {"alice/daily": 0, "alice/weekly": 0, "pool/monthly": 0}
    debit(session, "carol", 40)
    listed = limits.limits(session, "carol").limits
    assert listed[0].resets_at == datetime(2031, 3, 1, tzinfo=UTC)


def test_rolling_windows_slide(session: Session) -> None:
    tree(session)
    limits.set_limit(session, "alice", "per-minute", 10, "minute", rolling=True)
    limits.set_limit(session, "alice", "per-day", 25, "day", rolling=True)
    session.commit()
    t0 = datetime(2031, 1, 5, 23, 59, 30, 500000, tzinfo=UTC)
    at(session, t0)
    debit(session, "alice", 6)
    at(session, t0 + timedelta(seconds=40))  # across midnight: a rolling day does not turn
    debit(session, "alice", 4)
    assert refusal(session, "alice", 1).message.startswith("Spend limit exceeded: per-minute")
    [day, minute] = limits.limits(session, "alice").limits  # by name
    # The oldest spend counted leaves at its bucket's start + span + bucket (1 s; 15 min).
    assert minute.resets_at == datetime(2031, 1, 6, 0, 0, 31, tzinfo=UTC)
    assert day.resets_at == datetime(2031, 1, 7, tzinfo=UTC)
    at(session, t0 + timedelta(seconds=59))  # less than 60 s after the first: still counted
    assert refusal(session, "alice", 1).code == "LIMIT_EXCEEDED"
    at(session, t0 + timedelta(seconds=61))  # the first left; the second has not
    debit(session, "alice", 6)
    assert refusal(session, "alice", 1).code == "LIMIT_EXCEEDED"
    at(session, t0 + timedelta(seconds=130))  # both minute spends left
    debit(session, "alice", 9)
    assert used(session, "alice")["alice/per-day"] == 25
    assert refusal(session, "alice", 1).message.startswith("Spend limit exceeded: per-day")
    at(session, t0 + timedelta(days=1, minutes=16))
    assert used(session, "alice")["alice/per-day"] == 0
    debit(session, "alice", 10)


def test_holds_count_from_when_made_until_captured_released_or_past_their_end(
    session: Session,
) -> None:
    tree(session)
    limits.set_limit(session, "team", "daily", 100, "day")
    session.commit()
    a = reservations.reserve(session, "alice", amount=60)
    session.commit()
    assert used(session, "bob") == {"team/daily": 60}
    exc = refused(session, reservations.reserve, "bob", amount=41)
    assert exc.message == "Spend limit exceeded: daily on team. Limit: 100, Used: 60, Requested: 41"
    assert refused(session, reservations.extend, a.reservation_id, amount=41).code == (
        "LIMIT_EXCEEDED"
    )
    b = reservations.reserve(session, "bob", amount=30, ttl_seconds=60)
    session.commit()
    # A capture replaces its hold: 20 of alice's 60 spent, 40 freed.
    reservations.capture(session, a.reservation_id, amount=20)
    session.commit()
    assert used(session, "alice") == {"team/daily": 50}
    # A hold past its end no longer counts, swept or not.
    at(session, START + timedelta(seconds=61))
    assert used(session, "alice") == {"team/daily": 20}
    debit(session, "alice", 80)
    assert reservations.expire_batch(session, now=START + timedelta(seconds=61)) == 1
    session.commit()
    assert used(session, "alice") == {"team/daily": 100}
    c = reservations.reserve(session, "carol", amount=5)  # carol is not under the team
    reservations.release(session, c.reservation_id)
    session.commit()
    assert refusal(session, "bob", 1).code == "LIMIT_EXCEEDED"
    held = session.execute(text("SELECT sum(subtree_held) FROM accounts")).scalar_one()
    assert held == 0
    assert b.amount == 30


def test_a_capture_within_its_bounds_is_never_refused_and_its_excess_counts(
    session: Session,
) -> None:
    tree(session)
    limits.set_limit(session, "alice", "daily", 50, "day")
    session.commit()
    r = reservations.reserve(session, "alice", amount=40, overcapture_limit=30)
    session.commit()
    out = reservations.capture(session, r.reservation_id, amount=70)
    session.commit()
    assert out.overcaptured == 30
    listed = limits.limits(session, "alice").limits[0]
    assert (listed.used, listed.remaining) == (70, 0)
    assert refusal(session, "alice", 1).code == "LIMIT_EXCEEDED"
    # A limit lowered below what was used refuses every further spend in the window.
    limits.set_limit(session, "pool", "daily", 10, "day")
    session.commit()
    assert refusal(session, "carol", 1).message.startswith("Spend limit exceeded: daily on pool")


def test_refunds_give_back_what_their_entry_counted_in_its_own_window(
    session: Session,
) -> None:
    tree(session)
    limits.set_limit(session, "alice", "daily", 100, "day")
    session.commit()
    at(session, datetime(2031, 1, 5, 23, 59, 59, tzinfo=UTC))
    yesterday = debit(session, "alice", 100)
    at(session, datetime(2031, 1, 6, 0, 0, 1, tzinfo=UTC))
    today = debit(session, "alice", 100)
    assert refusal(session, "alice", 1).code == "LIMIT_EXCEEDED"
    movements.refund(session, "alice", 50, original_entry_id=yesterday.ledger_entry_id)
    session.commit()
    assert refusal(session, "alice", 1).code == "LIMIT_EXCEEDED"  # yesterday's window
    movements.refund(session, "alice", 30, original_entry_id=today.ledger_entry_id)
    movements.refund(session, "alice", 500)  # no original: not a refund of a counted spend
    session.commit()
    assert used(session, "alice") == {"alice/daily": 70}
    debit(session, "alice", 30)
    assert refusal(session, "alice", 1).code == "LIMIT_EXCEEDED"
    # The pool refunding alice's entry gives back alice's usage.
    movements.refund(session, "pool", 10, original_entry_id=today.ledger_entry_id)
    session.commit()
    assert used(session, "alice") == {"alice/daily": 90}
    assert_ledger_consistent(session)


def test_can_afford_and_a_batch_item_name_the_refusing_limit(session: Session) -> None:
    tree(session)
    limits.set_limit(session, "bob", "daily", 15, "day")
    session.commit()
    ok = accounts.can_afford(session, "bob", "image_generation")
    assert ok.can_afford and ok.limit is None
    assert "limit" not in ok.model_dump()
    debit(session, "bob", 10)
    no = accounts.can_afford(session, "bob", "image_generation")
    assert (no.can_afford, no.deficit) == (False, 0)
    assert no.limit is not None and (no.limit.name, no.limit.used) == ("daily", 10)
    out = batches.debit_batch(
        session,
        [
            DebitIn(user_id="bob", amount=5, operation_type="image_generation"),
            DebitIn(user_id="bob", amount=1, operation_type="image_generation"),
        ],
        "batch",
    )
    session.commit()
    assert (out.applied, out.refused) == (1, 1)
    failure = out.results[1].model_dump(mode="json")
    assert failure["error_code"] == "LIMIT_EXCEEDED"
    assert failure["limit"]["name"] == "daily" and failure["limit"]["used"] == 15


@pytest.mark.parametrize("rolling", [False, True])
def test_limits_of_plain_accounts(session: Session, rolling: bool) -> None:
    accounts.open_account(session, "solo", initial_balance=100)
    session.commit()
    limits.set_limit(session, "solo", "hourly", 10, "hour", rolling=rolling)
    session.commit()
    debit(session, "solo", 10, idempotency_key="k")
    assert debit(session, "solo", 10, idempotency_key="k").replayed
    exc = refusal(session, "solo", 1)
    assert exc.message == "Spend limit exceeded: hourly on solo. Limit: 10, Used: 10, Requested: 1"
    assert refused(session, reservations.reserve, "solo", amount=1).code == "LIMIT_EXCEEDED"


# --- races --------------------------------------------------------------------------------

RACE_LIMITS = {
    # account: (name, max_tokens, period, rolling)
    "pool": [("daily", 400, "day", False), ("hourly", 360, "hour", True)],
    "t0": [("daily", 150, "day", False), ("minute", 120, "minute", True)],
    "t1": [("daily", 150, "day", False), ("minute", 120, "minute", True)],
}
MEMBER_LIMITS = [("daily", 40, "day", False), ("burst", 25, "minute", True)]


def race_tree() -> list[str]:
    """pool -> t0, t1 -> 16 members each, limits on every level (RACE_LIMITS, MEMBER_LIMITS)."""
    members = [f"m{i:02}" for i in range(32)]
    with session_scope() as s:
        accounts.open_account(s, "pool", initial_balance=100_000)
        for team in ("t0", "t1"):
            accounts.open_account(s, team, parent_id="pool")
        for i, member in enumerate(members):
            accounts.open_account(s, member, parent_id=f"t{i % 2}")
        for user, those in [*RACE_LIMITS.items(), *((m, MEMBER_LIMITS) for m in members)]:
            for name, most, period, rolling in those:
                limits.set_limit(s, user, name, most, period, rolling)
    return members


def windows_in_the_ledger(session: Session, user_id: str, period: str, rolling: bool) -> int:
    """The most any window of a limit on ``user_id`` ever held, from the ledger: debits, charges
    and captures of the account and those below it, less refunds of them; a calendar window by
    its UTC start, a rolling one as every interval of its length ending at a spend."""
    spans = {"minute": 60, "hour": 3600, "day": 86400}
    rows = session.execute(
        text(
            """
            SELECT e.created_at, -e.tokens_amount - coalesce(t.refunded, 0) AS spent
            FROM ledger_entries e
            LEFT JOIN refund_totals t ON t.entry_id = e.id
            LEFT JOIN accounts s ON s.user_id = e.spent_by
            WHERE e.kind IN ('debit', 'charge', 'capture')
              AND (e.user_id = :u OR s.user_id = :u OR s.parent_id = :u)
            ORDER BY e.created_at
            """
        ),
        {"u": user_id},
    ).all()
    if not rolling:
        by_window: dict[Any, int] = {}
        for at_, spent in rows:
            key = at_.replace(hour=0, minute=0, second=0, microsecond=0)
            if period == "hour":
                key = at_.replace(minute=0, second=0, microsecond=0)
            by_window[key] = by_window.get(key, 0) + spent
        return max(by_window.values(), default=0)
    span = timedelta(seconds=spans[period])
    return max((sum(s for t, s in rows if end - span < t <= end) for end, _ in rows), default=0)


def test_racing_producers_never_take_a_window_past_its_limit(clean_db: None) -> None:
    """64 producers race debits, reserves, extensions, captures and releases from 32 members
    of a 3-level tree with limits on every level. From the ledger afterwards: no window of any
    limit ever held more than its max_tokens; every refusal named a limit of the spender's
    chain that the request would have broken; the pool's ledger is sound."""
    members = race_tree()
    chain = {m: {m, f"t{int(m[1:]) % 2}", "pool"} for m in members}
    refusals: list[tuple[str, int, dict[str, Any]]] = []

    def work(i: int) -> int:
        pick = random.Random(i)
        applied = 0
        for _ in range(12):
            member = pick.choice(members)
            amount = pick.randint(1, 6)
            if pick.random() < 0.5:
                out: Any = attempt(movements.debit, member, amount, "image_generation")
            else:
                out = attempt(reservations.reserve, member, amount=amount)
                if not isinstance(out, DomainError):
                    if pick.random() < 0.3:
                        more = attempt(reservations.extend, out.reservation_id, amount=2)
                        if isinstance(more, DomainError):
                            refusals.append((member, 2, more.fields.get("limit", {})))
                    if pick.random() < 0.7:
                        done = attempt(reservations.capture, out.reservation_id, amount=amount)
                        assert not isinstance(done, DomainError), done
                    else:
                        attempt(reservations.release, out.reservation_id)
            if isinstance(out, DomainError):
                assert out.code == "LIMIT_EXCEEDED", (out.code, out.message)
                refusals.append((member, amount, out.fields["limit"]))
            else:
                applied += 1
        return applied

    applied = sum(run_in_threads(64, work))
    assert applied and refusals, "the race never reached a limit"
    for member, requested, limit in refusals:
        assert limit["user_id"] in chain[member], (member, limit)
        assert limit["used"] + requested > limit["max_tokens"], limit
        assert limit["used"] <= limit["max_tokens"], limit
    with session_scope() as s:
        for user, those in [*RACE_LIMITS.items(), *((m, MEMBER_LIMITS) for m in members)]:
            for name, most, period, rolling in those:
                held = windows_in_the_ledger(s, user, period, rolling)
                assert held <= most, (user, name, held, most)
        for member in members:
            for listed in limits.limits(s, member).limits:
                assert listed.used <= listed.max_tokens, listed
        assert s.execute(text("SELECT sum(subtree_held) FROM accounts")).scalar_one() == 0
        assert_ledger_consistent(s)
        assert ledger.reconcile(s).mismatches == []


def test_limits_changed_while_debits_race_count_every_spend_once(clean_db: None) -> None:
    """Setting a limit takes the pool's lock, and a limit of a width no other limit reads
    counts its window from the ledger: an hour's limit removed and set again 15 times (each
    setting counted from the ledger) beside a day's set 15 times (its buckets kept), while 24
    members race 240 debits, and both end equal to the ledger, the day's never past its limit."""
    members = race_tree()
    with session_scope() as s:
        for user in ("pool", "t0", "t1", *members):
            for name, *_ in RACE_LIMITS.get(user, MEMBER_LIMITS):
                limits.set_limit(s, user, name, None)
        limits.set_limit(s, "pool", "daily", 150, "day")

    def work(i: int) -> None:
        if i == 0:
            for _ in range(15):
                attempt(limits.set_limit, "pool", "daily", 150, "day")
                attempt(limits.set_limit, "pool", "hourly", None)
                attempt(limits.set_limit, "pool", "hourly", 10_000, "hour")
            return
        for _ in range(10):
            out = attempt(movements.debit, members[i], 1, "chatgpt_message")
            assert not isinstance(out, DomainError) or out.code == "LIMIT_EXCEEDED", out

    run_in_threads(25, work)
    with session_scope() as s:
        spent = windows_in_the_ledger(s, "pool", "day", False)
        listed = {x.name: x.used for x in limits.limits(s, "pool").limits}
        assert spent <= 150
        assert listed == {
            "daily": spent,
            "hourly": windows_in_the_ledger(s, "pool", "hour", False),
        }


def reached(session: Session) -> list[tuple[str, str, int]]:
    return [
        (r.user_id, r.data["name"], r.data["used"])
        for r in session.execute(
            text("SELECT user_id, data FROM events WHERE type = 'limit.reached' ORDER BY id")
        )
    ]


def test_a_window_reaching_its_limit_writes_limit_reached_once(session: Session) -> None:
    """For the account the limit is set on, once per window and limit: not again when the
    window reaches it a second time, nor for a refusal; again in the next window."""
    tree(session)
    limits.set_limit(session, "alice", "daily", 10, "day")
    limits.set_limit(session, "team", "daily", 100, "day")
    session.commit()
    debit(session, "alice", 6)
    assert reached(session) == []
    last = debit(session, "alice", 4)
    assert reached(session) == [("alice", "daily", 10)]
    assert refusal(session, "alice", 1).code == "LIMIT_EXCEEDED"
    movements.refund(session, "alice", 4, original_entry_id=last.ledger_entry_id)
    session.commit()
    debit(session, "alice", 4)
    assert reached(session) == [("alice", "daily", 10)]
    at(session, datetime(2031, 1, 6, 1, tzinfo=UTC))
    r = reservations.reserve(session, "alice", amount=8, overcapture_limit=5)
    session.commit()
    reservations.capture(session, r.reservation_id, amount=12)  # past the limit: counted
    session.commit()
    assert reached(session) == [("alice", "daily", 10), ("alice", "daily", 12)]


def test_a_request_refused_by_a_limit_writes_limit_reached_once_per_window(
    session: Session,
) -> None:
    """The contract's other case: refused, the statement rolled back, the event is written
    after it (tokens.debit through its task, as a worker runs it), once per window and limit;
    a batch's refused item writes it with the batch."""
    from tasks import movements as movement_tasks

    tree(session)
    limits.set_limit(session, "alice", "daily", 10, "day")
    limits.set_limit(session, "bob", "daily", 5, "day")
    session.commit()
    debit(session, "alice", 6)

    def task_debit(user: str, amount: int) -> dict[str, Any]:
        kwargs = {"user_id": user, "amount": amount, "operation_type": "image_generation"}
        out: dict[str, Any] = movement_tasks.debit.apply(kwargs=kwargs).get()
        return out

    assert task_debit("alice", 5)["error_code"] == "LIMIT_EXCEEDED"
    session.expire_all()
    assert reached(session) == [("alice", "daily", 6)]  # the limit as listed: 6 of 10 used
    assert task_debit("alice", 5)["error_code"] == "LIMIT_EXCEEDED"
    assert reached(session) == [("alice", "daily", 6)]  # once per window
    out = batches.debit_batch(
        session,
        [DebitIn(user_id="bob", amount=9, operation_type="image_generation")],
        "batch-1",
    )
    session.commit()
    assert out.refused == 1
    assert reached(session) == [("alice", "daily", 6), ("bob", "daily", 0)]


def test_an_extend_a_members_limit_refuses_writes_limit_reached(session: Session) -> None:
    """A member's hold lives in its pool's ledger; an extend its own limit refuses writes the
    limit.reached of that limit (it was looked up under the pool, which has none, and wrote
    nothing)."""
    from tasks import reservations as reservation_tasks

    tree(session)
    limits.set_limit(session, "alice", "daily", 10, "day")
    session.commit()
    held = reservations.reserve(session, "alice", amount=6)
    session.commit()
    out = reservation_tasks.extend.apply(
        kwargs={"reservation_id": held.reservation_id, "ttl_seconds": 60, "amount": 5}
    ).get()
    assert out["error_code"] == "LIMIT_EXCEEDED", out
    session.expire_all()
    assert reached(session) == [("alice", "daily", 6)]


def test_a_movement_hands_out_the_limit_as_listed(session: Session) -> None:
    """A movement lists no limit unless it needs one (tokens_limit): the limit a refusal
    carries is the listing before the request, and the one limit.reached carries is the listing
    once the movement counted, whole, resets_at included, on every level and kind of window."""

    def listed(user_id: str) -> dict[str, dict[str, Any]]:
        rows = session.execute(
            text("SELECT l.listed FROM tokens_limits(:u, NULL) l"), {"u": user_id}
        ).scalars()
        return {f"{x['user_id']}/{x['name']}": x for x in rows}

    tree(session)
    limits.set_limit(session, "alice", "burst", 40, "minute", rolling=True)
    limits.set_limit(session, "alice", "daily", 100, "day")
    limits.set_limit(session, "team", "rolling-day", 30, "day", rolling=True)
    limits.set_limit(session, "pool", "monthly", 1000, "month")
    session.commit()
    debit(session, "alice", 4)
    before = listed("alice")
    assert before["alice/burst"]["resets_at"] is not None
    assert refusal(session, "alice", 37).fields["limit"] == before["alice/burst"]
    assert refusal(session, "bob", 27).fields["limit"] == before["team/rolling-day"]
    debit(session, "bob", 26)  # the team's rolling day: 30 of 30
    [data] = session.execute(
        text("SELECT data FROM events WHERE type = 'limit.reached' ORDER BY id")
    ).scalars()
    assert data == listed("bob")["team/rolling-day"] and data["remaining"] == 0
