"""Renewal policies (contract v1.1): ``add`` (v1) and ``reset`` with ``rollover_max``, through
renew_user and the sweep."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from accounting import accounts, clock, grants, movements, renewals, reservations
from models.schemas import RenewOut
from models.tables import Account, EntryGrant, Grant, LedgerEntry
from tests.polling import wait_for
from tests.support import assert_ledger_consistent, waiting_on_locks
from worker.db import session_factory
from worker.settings import Tier, get_settings

TIERS = {
    "Gift": Tier(tokens=100),
    "Add": Tier(tokens=1000),
    "Reset": Tier(tokens=1000, renewal="reset"),
    "Roll": Tier(tokens=1000, renewal="reset", rollover_max=300),
    "Zero": Tier(tokens=0, renewal="reset", rollover_max=50),
    # A rollover cap above the allowance: a rollover that rolled again would show.
    "Carry": Tier(tokens=200, renewal="reset", rollover_max=500),
}
PERIOD = timedelta(days=30)
# What each user spends after each renewal: some months nothing (a rollover must not roll
# again), some more than the balance (debt, paid first by the next allowance, once more than
# a whole allowance).
SPENDS = [0, 0, 250, 1200, 1500, 0, 999, 2600, 0, 50, 700, 1000, 0]
INITIAL = 100  # an adjustment grant (priority 50, never expires): spent after the allowance


@pytest.fixture(autouse=True)
def tiers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(
        "TOKENS_TIERS", json.dumps({name: t.model_dump() for name, t in TIERS.items()})
    )
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


@pytest.fixture
def sessions(clean_db: None) -> Callable[[], Session]:
    return session_factory()


def start(s: Session) -> datetime:
    """The first simulated renewal: the database's clock now, so every grant a renewal makes
    ends in the future (expiry is judged by the database's clock)."""
    return clock.db_now(s).astimezone(UTC)


@dataclass
class Model:
    """The rule, one user: what each kind of grant holds, and the debt."""

    tier: str
    allowance: int = 0
    rollover: int = 0
    adjustment: int = INITIAL
    debt: int = 0
    paid: int = 0  # what the last renewal's allowance paid of the debt

    @property
    def balance(self) -> int:
        return self.allowance + self.rollover + self.adjustment - self.debt

    def spend(self, amount: int) -> None:
        # Burn order: the rollover (made first), the allowance (both priority 10), then the
        # adjustment (priority 50); what they do not cover is debt.
        for kind in ("rollover", "allowance", "adjustment"):
            take = min(getattr(self, kind), amount)
            setattr(self, kind, getattr(self, kind) - take)
            amount -= take
        self.debt += amount

    def renew(self) -> tuple[int, int]:
        """The renewal; returns (expired, rolled over)."""
        config = TIERS[self.tier]
        expired = rolled = 0
        if config.renewal == "reset":
            expired = self.allowance + self.rollover
            rolled = min(self.allowance, config.rollover_max)
            self.allowance, self.rollover = 0, rolled
        self.paid = min(self.debt, config.tokens)
        self.debt -= self.paid
        self.allowance += config.tokens - self.paid
        return expired, rolled

    def by_kind(self) -> dict[str, int]:
        kinds = {"allowance": self.allowance, "rollover": self.rollover}
        return {k: v for k, v in kinds.items() | {("adjustment", self.adjustment)} if v}


def open_users(sessions: Callable[[], Session], users: dict[str, str]) -> None:
    with sessions() as s:
        for user_id, tier in users.items():
            accounts.open_account(s, user_id, tier=tier, initial_balance=INITIAL)
        s.commit()


def spend(sessions: Callable[[], Session], user_id: str, amount: int) -> None:
    if amount:
        with sessions() as s:
            movements.debit(s, user_id, amount, "image_generation", allow_overdraft=True)
            s.commit()


def last_entry_id(s: Session) -> int:
    return s.scalar(select(LedgerEntry.id).order_by(LedgerEntry.id.desc()).limit(1)) or 0


def check_renewal_entries(s: Session, user_id: str, after_id: int, model: Model) -> None:
    """The renewal's entries: an expiry (when anything left) then the monthly_reset, chained,
    each split as the rule says."""
    entries = list(
        s.scalars(
            select(LedgerEntry)
            .where(LedgerEntry.user_id == user_id, LedgerEntry.id > after_id)
            .order_by(LedgerEntry.created_at, LedgerEntry.id)
        )
    )
    assert entries[-1].operation_type == "monthly_reset"
    assert entries[-1].tokens_amount == TIERS[model.tier].tokens
    for previous, entry in pairwise(entries):
        assert entry.balance_before == previous.balance_after
        assert entry.created_at == previous.created_at
    assert entries[-1].balance_after == model.balance
    splits = {
        e.id: [
            (gid, amount)
            for gid, amount in s.execute(
                select(EntryGrant.grant_id, EntryGrant.amount)
                .where(EntryGrant.entry_id == e.id)
                .order_by(EntryGrant.seq)
            )
        ]
        for e in entries
    }
    kinds = dict(s.execute(select(Grant.id, Grant.kind).where(Grant.user_id == user_id)).all())
    if len(entries) == 2:
        expiry = entries[0]
        assert (expiry.operation_type, expiry.kind) == ("expiry", "expiry")
        gone = [(g, a) for g, a in splits[expiry.id] if a < 0]
        made = [(g, a) for g, a in splits[expiry.id] if a > 0]
        assert expiry.meta == {
            "grant_id": str(gone[0][0]),
            "grant_ids": [str(g) for g, _ in gone],
            "reason": "renewal",
        }
        assert {kinds[g] for g, _ in gone} <= {"allowance", "rollover"}
        assert [kinds[g] for g, _ in made] == (["rollover"] if model.rollover else [])
        assert sum(a for _, a in made) == model.rollover
    else:
        assert len(entries) == 1
    allowance = splits[entries[-1].id]
    if TIERS[model.tier].tokens:
        assert [kinds[g] for g, _ in allowance] == ["allowance"]
        assert allowance[0][1] == TIERS[model.tier].tokens - model.paid
    else:
        assert allowance == []


def check_user(s: Session, user_id: str, model: Model) -> None:
    balance = s.scalar(select(Account.tokens_balance).where(Account.user_id == user_id))
    debt = s.scalar(select(Account.debt).where(Account.user_id == user_id))
    assert (balance, debt) == (model.balance, model.debt), user_id
    assert grants.by_kind(s, user_id) == model.by_kind(), user_id


def rolled_grants_rolled_once(s: Session, user_id: str, tier: str) -> None:
    """Every rollover grant but the newest has ended, and what it had left expired: a rollover
    never becomes the next rollover."""
    rows = s.execute(
        select(Grant.status, Grant.amount, Grant.expired, Grant.spent)
        .where(Grant.user_id == user_id, Grant.kind == "rollover")
        .order_by(Grant.id)
    ).all()
    for status, amount, expired, spent in rows[:-1]:
        assert status in ("expired", "depleted") and expired + spent == amount
    for _, amount, _, _ in rows:
        assert amount <= min(TIERS[tier].tokens, TIERS[tier].rollover_max)


@pytest.mark.parametrize("tier", ["Add", "Reset", "Roll", "Zero", "Carry"])
def test_thirteen_renewals_follow_the_policy_exactly(
    sessions: Callable[[], Session], tier: str
) -> None:
    """renew_user over 13 simulated months: after each renewal the balance, debt and grants by
    kind are exactly the rule's (no drift), the result reports what expired and rolled over,
    the entries chain, and the ledger is consistent."""
    open_users(sessions, {"u": tier})
    model = Model(tier)
    with sessions() as s:
        first = start(s)
    for month, amount in enumerate(SPENDS):
        now = first + month * PERIOD
        with sessions() as s:
            before_id = last_entry_id(s)
            out = renewals.renew_user(s, "u", now=now)
            s.commit()
            previous = model.balance
            expired, rolled = model.renew()
            assert isinstance(out, RenewOut)
            assert (out.tokens_expired, out.tokens_rolled_over) == (expired, rolled), month
            assert (out.previous_balance, out.new_balance) == (previous, model.balance), month
            check_user(s, "u", model)
            check_renewal_entries(s, "u", before_id, model)
            assert_ledger_consistent(s)
        spend(sessions, "u", amount)
        model.spend(amount)
        with sessions() as s:
            check_user(s, "u", model)
    with sessions() as s:
        rolled_grants_rolled_once(s, "u", tier)
        # Reset grants end the day after the next renewal date; add grants never end.
        expected_end = (
            renewals.next_renewal_date(now, 30) + timedelta(days=1)
            if TIERS[tier].renewal == "reset"
            else None
        )
        newest = s.scalars(
            select(Grant.expires_at)
            .where(Grant.user_id == "u", Grant.kind.in_(("allowance", "rollover")))
            .order_by(Grant.id.desc())
            .limit(1)
        ).one_or_none()
        if TIERS[tier].tokens:
            assert newest == expected_end
        else:
            assert s.scalar(select(Grant.id).where(Grant.kind == "allowance")) is None
        assert_ledger_consistent(s)


def test_the_sweep_under_reset_gives_what_renew_user_gives(
    sessions: Callable[[], Session],
) -> None:
    """Twins, one renewed by renew_user, the other by the sweep (several chunks): the same
    balances, debts and grants every month for 13 months, and both as the rule says."""
    tiers = ["Reset", "Roll", "Roll", "Add", "Zero", "Reset", "Roll", "Carry", "Carry"]
    users = {f"{side}-{i}": tier for i, tier in enumerate(tiers) for side in ("r", "s")}
    open_users(sessions, users)
    models = {u: Model(t) for u, t in users.items()}
    with sessions() as s:
        first = start(s)
    for month in range(13):
        now = first + month * PERIOD
        with sessions() as s:
            for user_id in users:
                if user_id.startswith("r-"):
                    renewals.renew_user(s, user_id, now=now)
            s.commit()
        out = renewals.sweep(sessions, now=now, chunk_size=2)
        assert (out.successful, out.failed, out.skipped) == (len(tiers), 0, 0)
        with sessions() as s:
            for user_id, model in models.items():
                model.renew()
                check_user(s, user_id, model)
            assert_ledger_consistent(s)
        for i, _ in enumerate(tiers):
            amount = SPENDS[(month + i) % len(SPENDS)]
            for side in ("r", "s"):
                spend(sessions, f"{side}-{i}", amount)
                models[f"{side}-{i}"].spend(amount)
    with sessions() as s:
        for i, _ in enumerate(tiers):
            twins = [
                [
                    (e.kind, e.operation_type, e.tokens_amount, e.balance_after)
                    for e in s.scalars(
                        select(LedgerEntry)
                        .where(LedgerEntry.user_id == f"{side}-{i}")
                        .order_by(LedgerEntry.created_at, LedgerEntry.id)
                    )
                ]
                for side in ("r", "s")
            ]
            assert twins[0] == twins[1]
        assert_ledger_consistent(s)


def renew(sessions: Callable[[], Session], user_id: str, now: datetime, how: str) -> None:
    if how == "renew_user":
        with sessions() as s:
            renewals.renew_user(s, user_id, now=now)
            s.commit()
    else:
        assert renewals.sweep(sessions, now=now, chunk_size=1).successful == 1


def balance_of(s: Session, user_id: str) -> tuple[int, int]:
    row = s.execute(
        select(Account.tokens_balance, Account.debt).where(Account.user_id == user_id)
    ).one()
    return int(row[0]), int(row[1])


def last_expiry(s: Session, user_id: str) -> LedgerEntry:
    return s.scalars(
        select(LedgerEntry)
        .where(LedgerEntry.user_id == user_id, LedgerEntry.kind == "expiry")
        .order_by(LedgerEntry.id.desc())
        .limit(1)
    ).one()


@pytest.mark.parametrize("how", ["renew_user", "sweep"])
def test_a_reset_leaves_held_tokens_to_their_reservation(
    sessions: Callable[[], Session], how: str
) -> None:
    """What reservations hold of the old allowance is not expired at the reset, nor rolled
    over; a capture still spends it, a release lets it expire at once."""
    open_users(sessions, {"u": "Roll"})
    with sessions() as s:
        first = start(s)
    renew(sessions, "u", first, how)
    with sessions() as s:
        # Holds come from the allowance first (priority 10, before the adjustment's 50).
        kept = reservations.reserve(s, "u", 400).reservation_id
        freed = reservations.reserve(s, "u", 100).reservation_id
        s.commit()
    renew(sessions, "u", first + PERIOD, how)
    with sessions() as s:
        # Left of the allowance: 1000 - 500 held; rolled: min(500, 300).
        expiry = last_expiry(s, "u")
        assert expiry.tokens_amount == -500 + 300
        assert balance_of(s, "u") == (1100 - 500 + 300 + 1000, 0)
        assert grants.by_kind(s, "u") == {"allowance": 1500, "rollover": 300, "adjustment": 100}
        assert_ledger_consistent(s)
    with sessions() as s:
        reservations.capture(s, kept, 400)
        s.commit()
    with sessions() as s:
        reservations.release(s, freed)
        s.commit()
    with sessions() as s:
        assert balance_of(s, "u") == (1000 + 300 + INITIAL, 0)
        old = s.execute(
            select(Grant.status, Grant.spent, Grant.expired)
            .where(Grant.user_id == "u", Grant.kind == "allowance")
            .order_by(Grant.id)
        ).first()
        assert tuple(old or ()) == ("expired", 400, 600)
        assert_ledger_consistent(s)


@pytest.mark.parametrize("how", ["renew_user", "sweep"])
def test_debt_is_paid_first_by_the_allowance_not_by_the_rollover(
    sessions: Callable[[], Session], how: str
) -> None:
    """Debt beside free allowance tokens (freed by a release after the overdraft): the reset
    expires and rolls them over as ever, the rollover keeps its tokens, the allowance pays."""
    open_users(sessions, {"u": "Roll"})
    with sessions() as s:
        first = start(s)
    renew(sessions, "u", first, how)
    with sessions() as s:
        held = reservations.reserve(s, "u", 400).reservation_id
        s.commit()
    # The other 600 of the allowance, the adjustment, and 250 more: debt.
    spend(sessions, "u", 600 + INITIAL + 250)
    with sessions() as s:
        reservations.release(s, held)  # the allowance still runs: 400 free again
        s.commit()
    with sessions() as s:
        assert balance_of(s, "u") == (150, 250)
    renew(sessions, "u", first + PERIOD, how)
    with sessions() as s:
        assert last_expiry(s, "u").tokens_amount == -400 + 300
        assert balance_of(s, "u") == (150 - 400 + 300 + 1000, 0)
        assert grants.by_kind(s, "u") == {"allowance": 750, "rollover": 300}
        reset = s.scalars(
            select(LedgerEntry)
            .where(LedgerEntry.operation_type == "monthly_reset")
            .order_by(LedgerEntry.id.desc())
            .limit(1)
        ).one()
        assert (reset.tokens_amount, reset.balance_after) == (1000, 1050)
        assert_ledger_consistent(s)


def test_a_reset_waited_for_reads_the_grants_its_holder_left(clean_db: None) -> None:
    """PostgreSQL: the sweep skips a user a debit holds, waits for it after its own commit,
    then resets from the allowance as the debit left it (the statement's snapshot predates the
    debit; the grants' lock re-reads them): 100 left, so 100 expire and 100 roll over."""
    sessions = session_factory()
    open_users(sessions, {u: "Roll" for u in ("a", "b", "c")})
    with sessions() as s:
        first = start(s)
        for user_id in ("a", "b", "c"):
            renewals.renew_user(s, user_id, now=first)
        s.commit()
    results: list[int] = []
    with sessions() as holder:
        movements.debit(holder, "b", 900, "image_generation")  # uncommitted: "b" stays locked
        thread = threading.Thread(
            target=lambda: results.append(
                renewals.sweep(sessions, now=first + PERIOD, chunk_size=5).successful
            )
        )
        thread.start()
        wait_for(waiting_on_locks, 10, "the sweep waiting for b")
        holder.commit()
    thread.join(30)
    assert results == [3]
    with sessions() as s:
        assert balance_of(s, "b") == (1100 - 900 - 100 + 100 + 1000, 0)
        assert grants.by_kind(s, "b") == {"allowance": 1000, "rollover": 100, "adjustment": 100}
        assert grants.by_kind(s, "a") == {"allowance": 1000, "rollover": 300, "adjustment": 100}
        assert_ledger_consistent(s)


@pytest.mark.parametrize(
    "config",
    [{"tokens": 10, "renewal": "rollover"}, {"tokens": 10, "renewal": "reset", "rollover_max": -1}],
)
def test_a_tier_with_an_unknown_policy_or_a_negative_rollover_is_refused(
    config: dict[str, object],
) -> None:
    with pytest.raises(ValidationError):
        Tier.model_validate(config)
    assert Tier.model_validate({"tokens": 10}).renewal == "add"
