"""The task contract (v1, v1.1, v1.2) as plain Python: accounts, grants, holds, the ledger,
pools and spend limits.

Written from ../shared/CONTRACT.md; it imports nothing of the worker (no accounting/, worker/,
tasks/, models/, no database). Where the contract is silent the production code was read and the
choice is marked ``silent:`` below; where they disagree the contract is modelled.

Time is given by the caller (``now`` on every call): the model has no clock. Ids of entries and
grants are the model's own (a counter each); reservation ids are the caller's (the worker chooses
them). Every request returns a plain dict shaped like the task's JSON result.

Spend limits count what the contract says counts, from the model's own record of each spend
(``Spend``: made when, by whom, less what was refunded of it), so a window's ``used`` follows
the contract's words: calendar windows are UTC (a week from Monday, a month from the 1st);
rolling ones count exactly the last 60 s, 1 h, 24 h, 7 or 30 days, and pruning the ledger's
old entries forgets no spend.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Any

PRICES: dict[str, int] = {
    "image_generation": 10,
    "sora_image": 10,
    "product_card": 10,
    "chatgpt_message": 5,
    "refund": 0,
    "purchase": 0,
    "monthly_reset": 0,
    "adjustment": 0,
    "expiry": 0,
}
FREE_TIERS = frozenset({"Gift"})
DEFAULT_PRIORITY = {"allowance": 10, "rollover": 10, "purchased": 50, "promo": 20, "adjustment": 50}
# silent: the contract names debits and charges; a capture is the charge of a reservation.
REFUNDABLE = ("debit", "charge", "capture")
MAX_HOLD = timedelta(days=7)
CARRIED_FORWARD = "carried_forward"
# v1.2 spend limits: a rolling window's span per period; at most 8 limits per account.
ROLLING_SPANS = {
    "minute": timedelta(seconds=60),
    "hour": timedelta(hours=1),
    "day": timedelta(hours=24),
    "week": timedelta(days=7),
    "month": timedelta(days=30),
}
MAX_LIMITS = 8
MAX_AMOUNT = 10**12


@dataclass(frozen=True)
class TierRule:
    tokens: int
    period_days: int = 30
    renewal: str = "add"  # or "reset"
    rollover_max: int = 0


DEFAULT_TIERS = {
    "Gift": TierRule(100),
    "Professional": TierRule(2000),
    "Business": TierRule(10000),
}


class Refused(Exception):
    def __init__(self, code: str, message: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = dict(fields or {})

    def result(self) -> dict[str, Any]:
        return {"success": False, "error": self.message, "error_code": self.code, **self.fields}


def user_not_found() -> Refused:
    return Refused("USER_NOT_FOUND", "User not found")


def insufficient(required: int, available: int) -> Refused:
    return Refused(
        "INSUFFICIENT_TOKENS", f"Insufficient tokens. Required: {required}, Available: {available}"
    )


def invalid_amount(what: str) -> Refused:
    return Refused("INVALID_AMOUNT", f"{what} amount must be positive")


def not_active(status: str) -> Refused:
    return Refused("RESERVATION_NOT_ACTIVE", f"Reservation is {status}")


@dataclass
class Grant:
    id: int
    user_id: str
    kind: str
    amount: int
    remaining: int
    priority: int
    expires_at: datetime | None
    created_at: datetime
    status: str = "active"
    held: int = 0
    spent: int = 0
    expired: int = 0
    returned: int = 0

    def burn_key(self) -> tuple[int, int, datetime, datetime, int]:
        # priority, expires_at (never-expiring last), created_at, then id (creation order)
        far = datetime.max.replace(tzinfo=UTC)
        return (
            self.priority,
            1 if self.expires_at is None else 0,
            self.expires_at or far,
            self.created_at,
            self.id,
        )

    def ended_by(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass
class Entry:
    id: int
    user_id: str
    kind: str
    operation_type: str
    amount: int
    before: int
    after: int
    created_at: datetime
    key: str | None = None
    original: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    splits: list[tuple[int, int]] = field(default_factory=list)
    spent_by: str | None = None  # v1.2: the member that made it, in its pool's ledger


@dataclass
class Hold:
    id: str
    user_id: str
    amount: int
    operation_type: str | None
    expires_at: datetime
    created_at: datetime
    overcapture_limit: int
    metadata: dict[str, Any]
    grants: dict[int, int] = field(default_factory=dict)  # grant id -> tokens held
    status: str = "active"
    spent_by: str | None = None  # v1.2: the member that made it (user_id: its pool)

    @property
    def spender(self) -> str:
        """Whose keys the reservation's capture, release and extend use."""
        return self.spent_by or self.user_id


@dataclass
class Account:
    user_id: str
    tier: str
    last_renewal_at: datetime | None
    subscription_expires_at: datetime | None
    balance: int = 0
    reserved: int = 0
    spent: int = 0
    debt: int = 0
    # v1.2 pools: a member's pool (holding its balance) and parent; None for a pool
    pool_id: str | None = None
    parent_id: str | None = None


@dataclass
class Limit:
    """A spend limit set on ``user_id`` (v1.2): it caps that account and every one below it."""

    user_id: str
    name: str
    max_tokens: int
    period: str
    rolling: bool


@dataclass
class Spend:
    """What a debit, charge or capture counts against limits: ``amount`` spent by ``spender``
    (a member, or the pool itself) at ``created_at``, less what was refunded of that entry.
    Kept apart from the ledger: pruning old entries does not forget what a window spent."""

    entry_id: int
    pool: str
    spender: str
    created_at: datetime
    amount: int
    refunded: int = 0

    @property
    def net(self) -> int:
        return self.amount - self.refunded


def calendar_window(period: str, now: datetime) -> tuple[datetime, datetime]:
    """The UTC calendar window holding ``now``: [start, end). A week starts on Monday, a
    month on the 1st."""
    now = now.astimezone(UTC)
    if period == "minute":
        start = now.replace(second=0, microsecond=0)
        return start, start + timedelta(minutes=1)
    if period == "hour":
        start = now.replace(minute=0, second=0, microsecond=0)
        return start, start + timedelta(hours=1)
    day = midnight(now)
    if period == "day":
        return day, day + timedelta(days=1)
    if period == "week":
        start = day - timedelta(days=now.weekday())
        return start, start + timedelta(days=7)
    start = day.replace(day=1)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def limit_exceeded(listed: dict[str, Any], requested: int) -> Refused:
    return Refused(
        "LIMIT_EXCEEDED",
        f"Spend limit exceeded: {listed['name']} on {listed['user_id']}. "
        f"Limit: {listed['max_tokens']}, Used: {listed['used']}, Requested: {requested}",
        {"limit": listed},
    )


def member_account(pool: str) -> Refused:
    return Refused("MEMBER_ACCOUNT", f"Account is a member of {pool}: move tokens on the pool")


@dataclass
class _Change:
    """One entry's effect while it is built: signed change per grant, in order, and debt."""

    splits: list[tuple[int, int]] = field(default_factory=list)
    debt_delta: int = 0

    def add(self, grant_id: int, amount: int) -> None:
        for i, (gid, before) in enumerate(self.splits):
            if gid == grant_id:
                self.splits[i] = (gid, before + amount)
                return
        self.splits.append((grant_id, amount))

    @property
    def delta(self) -> int:
        return sum(a for _, a in self.splits) - self.debt_delta


def with_reason(metadata: dict[str, Any] | None, reason: str | None) -> dict[str, Any]:
    """An entry's metadata: the request's, plus ``reason`` unless it names one (silent: the
    contract does not say where a reason goes; the worker keeps it in the metadata)."""
    meta = dict(metadata or {})
    if reason is not None:
        meta.setdefault("reason", reason)
    return meta


def midnight(moment: datetime) -> datetime:
    return datetime.combine(moment.astimezone(UTC).date(), time(), tzinfo=UTC)


class Model:
    def __init__(self, tiers: dict[str, TierRule] | None = None) -> None:
        self.tiers = dict(DEFAULT_TIERS if tiers is None else tiers)
        self.accounts: dict[str, Account] = {}
        self.grants: dict[int, Grant] = {}
        self.entries: dict[int, Entry] = {}
        self.holds: dict[str, Hold] = {}
        self.keys: dict[tuple[str, str], tuple[tuple[Any, ...], dict[str, Any]]] = {}
        self.refunded: dict[int, int] = {}
        # v1.2 spend limits: per account, by name; what each spend entry counts against them
        self.limits: dict[str, dict[str, Limit]] = {}
        self.counted: dict[int, Spend] = {}
        self._ids = 0

    def _next_id(self) -> int:
        self._ids += 1
        return self._ids

    # --- time -------------------------------------------------------------------------------

    def shift(self, delta: timedelta) -> None:
        """Every stored moment moves back by ``delta``: the clock moved forward by it."""
        for a in self.accounts.values():
            if a.last_renewal_at is not None:
                a.last_renewal_at -= delta
            if a.subscription_expires_at is not None:
                a.subscription_expires_at -= delta
        for g in self.grants.values():
            g.created_at -= delta
            if g.expires_at is not None:
                g.expires_at -= delta
        for e in self.entries.values():
            e.created_at -= delta
        for h in self.holds.values():
            h.created_at -= delta
            h.expires_at -= delta
        for s in self.counted.values():
            s.created_at -= delta

    # --- reads of the state -----------------------------------------------------------------

    def user_grants(self, user_id: str) -> list[Grant]:
        return [g for g in self.grants.values() if g.user_id == user_id]

    def user_entries(self, user_id: str) -> list[Entry]:
        found = [e for e in self.entries.values() if e.user_id == user_id]
        return sorted(found, key=lambda e: (e.created_at, e.id))

    def _account(self, user_id: str) -> Account:
        account = self.accounts.get(user_id)
        if account is None:
            raise user_not_found()
        return account

    def _pool(self, user_id: str) -> Account:
        """The account holding ``user_id``'s balance: its pool, or itself."""
        account = self._account(user_id)
        return account if account.pool_id is None else self.accounts[account.pool_id]

    def _spender(self, account: Account, user_id: str) -> str | None:
        """An entry's ``spent_by``: the member that moved its pool's (``account``'s) tokens."""
        return None if user_id == account.user_id else user_id

    # --- the rules --------------------------------------------------------------------------

    def _free(self, user_id: str, now: datetime) -> list[Grant]:
        """Spendable grants in burn order: active, not due, with tokens no hold has."""
        live = [
            g
            for g in self.user_grants(user_id)
            if g.status == "active" and not g.ended_by(now) and g.remaining > g.held
        ]
        return sorted(live, key=Grant.burn_key)

    def _write(
        self,
        account: Account,
        change: _Change,
        now: datetime,
        *,
        kind: str,
        operation_type: str,
        spent_delta: int = 0,
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
        original: int | None = None,
        spent_by: str | None = None,
    ) -> Entry:
        delta = change.delta
        account.debt += change.debt_delta
        account.balance += delta
        account.spent = max(0, account.spent + spent_delta)
        if spent_by is not None:
            member = self.accounts[spent_by]
            member.spent = max(0, member.spent + spent_delta)
        entry = Entry(
            id=self._next_id(),
            user_id=account.user_id,
            kind=kind,
            operation_type=operation_type,
            amount=delta,
            before=account.balance - delta,
            after=account.balance,
            created_at=now,
            key=key,
            original=original,
            metadata=dict(metadata or {}),
            splits=[(g, a) for g, a in change.splits if a != 0],
            spent_by=spent_by,
        )
        self.entries[entry.id] = entry
        if kind in REFUNDABLE:
            self.counted[entry.id] = Spend(
                entry.id, account.user_id, spent_by or account.user_id, now, -delta
            )
        return entry

    def _expire_grant(self, account: Account, grant: Grant, tokens: int, now: datetime) -> None:
        grant.remaining -= tokens
        grant.expired += tokens
        if grant.remaining == 0:
            grant.status = "expired"
        change = _Change([(grant.id, -tokens)])
        self._write(
            account,
            change,
            now,
            kind="expiry",
            operation_type="expiry",
            metadata={"grant_id": grant.id},
        )

    def _expire_due(self, account: Account, now: datetime) -> tuple[int, int]:
        """Expire what is left (less holds) of the user's due grants: one entry each, soonest
        end first. Returns (grants, tokens)."""
        due = [
            g
            for g in self.user_grants(account.user_id)
            if g.status == "active" and g.ended_by(now) and g.remaining > g.held
        ]
        due.sort(key=lambda g: (g.expires_at, g.id))
        tokens = 0
        for g in due:
            left = g.remaining - g.held
            tokens += left
            self._expire_grant(account, g, left, now)
        return len(due), tokens

    def _lock(self, user_id: str, now: datetime) -> Account:
        """The pool of ``user_id`` (itself unless a member), its due grants expired."""
        account = self._pool(user_id)
        self._expire_due(account, now)
        return account

    def _spend(
        self, account: Account, change: _Change, amount: int, now: datetime, into_debt: bool
    ) -> int:
        left = amount
        for g in self._free(account.user_id, now):
            if left == 0:
                break
            take = min(g.remaining - g.held, left)
            g.remaining -= take
            g.spent += take
            if g.remaining == 0:
                g.status = "depleted"
            change.add(g.id, -take)
            left -= take
        assert into_debt or left == 0, "spend beyond the free tokens"
        change.debt_delta += left
        return left

    def _grant(
        self,
        account: Account,
        change: _Change,
        kind: str,
        amount: int,
        now: datetime,
        priority: int | None = None,
        expires_at: datetime | None = None,
    ) -> Grant:
        """A new grant pays the debt first."""
        debt = account.debt + change.debt_delta
        paid = min(debt, amount)
        grant = Grant(
            id=self._next_id(),
            user_id=account.user_id,
            kind=kind,
            amount=amount,
            remaining=amount - paid,
            spent=paid,
            priority=DEFAULT_PRIORITY[kind] if priority is None else priority,
            expires_at=expires_at,
            created_at=now,
            status="active" if amount > paid else "depleted",
        )
        self.grants[grant.id] = grant
        change.add(grant.id, amount - paid)
        change.debt_delta -= paid
        return grant

    # --- idempotency --------------------------------------------------------------------------

    def _keyed(
        self,
        user_id: str,
        key: str | None,
        request: tuple[Any, ...],
        run: Callable[[], dict[str, Any]],
    ) -> dict[str, Any]:
        """Same key and request: the first result again (``replayed``); same key, another
        request: IDEMPOTENCY_CONFLICT. A refusal keeps nothing, so the key stays unused."""
        if key is not None and (user_id, key) in self.keys:
            stored_request, result = self.keys[(user_id, key)]
            if stored_request != request:
                raise Refused(
                    "IDEMPOTENCY_CONFLICT", "Idempotency key reused with different parameters"
                )
            again = copy.deepcopy(result)
            if "replayed" in again:
                again["replayed"] = True
            return again
        result = run()
        if key is not None:
            self.keys[(user_id, key)] = (request, copy.deepcopy(result))
        return result

    def _atomic(self, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run a request; a refusal changes nothing (the state is restored)."""
        saved = copy.deepcopy(self.__dict__)
        try:
            return run()
        except Refused as refusal:
            self.__dict__.update(saved)
            return refusal.result()

    # --- results ---------------------------------------------------------------------------

    def _movement(self, account: Account, entry: Entry) -> dict[str, Any]:
        """A member's movement: its own user_id and tokens_spent, its pool's balance."""
        mover = account if entry.spent_by is None else self.accounts[entry.spent_by]
        return {
            "success": True,
            "user_id": mover.user_id,
            "operation_type": entry.operation_type,
            "amount": entry.amount,
            "balance_before": entry.before,
            "new_balance": entry.after,
            "tokens_spent": mover.spent,
            "ledger_entry_id": entry.id,
            "replayed": False,
        }

    def _balance_fields(self, member: Account, now: datetime) -> dict[str, Any]:
        """A member's are its pool's, but for its user_id, tokens_spent, pool_id, parent_id."""
        account = self._pool(member.user_id)
        active = [g for g in self.user_grants(account.user_id) if g.status == "active"]
        by_kind: dict[str, int] = {}
        for g in active:
            if g.remaining:
                by_kind[g.kind] = by_kind.get(g.kind, 0) + g.remaining
        ending = [
            g for g in active if g.remaining > 0 and g.expires_at is not None and g.expires_at > now
        ]
        next_expiry = None
        if ending:
            at = min(g.expires_at for g in ending if g.expires_at is not None)
            tokens = sum(g.remaining for g in ending if g.expires_at == at)
            next_expiry = {"at": at, "tokens": tokens}
        return {
            "success": True,
            "user_id": member.user_id,
            "tokens_balance": account.balance,
            "tokens_reserved": account.reserved,
            "tokens_available": account.balance - account.reserved,
            "tokens_spent": member.spent,
            "tier": account.tier,
            "last_renewal_at": account.last_renewal_at,
            "subscription_expires_at": account.subscription_expires_at,
            "by_kind": dict(sorted(by_kind.items())),
            "debt": account.debt,
            "next_expiry": next_expiry,
            "pool_id": member.pool_id,
            "parent_id": member.parent_id,
        }

    def _settled_view(self, user_id: str, now: datetime) -> dict[str, Any]:
        """The balance fields as a read sees them: due grants count as expired (contract:
        "for every read"). silent: whether a read writes their expiry entries; every read of
        the worker that answers with balance fields does, as this does."""
        self._lock(user_id, now)
        return self._balance_fields(self.accounts[user_id], now)

    # --- accounts ---------------------------------------------------------------------------

    def _tier(self, tier: str) -> TierRule:
        rule = self.tiers.get(tier)
        if rule is None:
            raise Refused("VALIDATION_ERROR", f"Unknown tier: {tier}")
        return rule

    def open_account(
        self,
        now: datetime,
        user_id: str,
        tier: str = "Gift",
        initial_balance: int = 0,
        subscription_expires_at: datetime | None = None,
        last_renewal_at: datetime | None = None,
        parent_id: str | None = None,
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            self._tier(tier)
            if initial_balance < 0:
                raise Refused("NEGATIVE_BALANCE", "Balance cannot be negative")
            pool_id = None
            if parent_id is not None:
                if initial_balance != 0:
                    raise Refused(
                        "VALIDATION_ERROR",
                        "Invalid arguments: initial_balance: must be 0 for a member (tokens enter"
                        " through the pool)",
                    )
                parent = self.accounts.get(parent_id)
                if parent is None:
                    raise Refused("PARENT_NOT_FOUND", "Parent account not found")
                above = None if parent.parent_id is None else self.accounts[parent.parent_id]
                if above is not None and above.parent_id is not None:
                    raise Refused(
                        "VALIDATION_ERROR",
                        "Invalid arguments: parent_id: at most 3 levels (pool, team, member); the"
                        " parent is a member of a team",
                    )
                pool_id = parent.pool_id or parent.user_id
            if user_id in self.accounts:
                return {**self._settled_view(user_id, now), "created": False}
            account = Account(user_id, tier, last_renewal_at, subscription_expires_at)
            account.pool_id, account.parent_id = pool_id, parent_id
            self.accounts[user_id] = account
            if initial_balance:
                change = _Change()
                self._grant(account, change, "adjustment", initial_balance, now)
                self._write(
                    account,
                    change,
                    now,
                    kind="adjustment",
                    operation_type="adjustment",
                    metadata={"reason": "initial_balance"},
                )
            return {**self._balance_fields(account, now), "created": True}

        return self._atomic(run)

    def set_tier(
        self, now: datetime, user_id: str, tier: str, subscription_expires_at: datetime | None
    ) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            self._tier(tier)
            account = self._account(user_id)
            if account.pool_id is not None:
                raise member_account(account.pool_id)
            account.tier = tier
            account.subscription_expires_at = subscription_expires_at
            return self._settled_view(user_id, now)

        return self._atomic(run)

    def get_balance(self, now: datetime, user_id: str) -> dict[str, Any]:
        return self._atomic(lambda: self._settled_view(user_id, now))

    def can_afford(self, now: datetime, user_id: str, operation_type: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            cost = self._cost(operation_type)
            account = self._lock(user_id, now)
            available = account.balance - account.reserved
            refusing = self._refusing(user_id, cost, now)
            out: dict[str, Any] = {
                "success": True,
                "can_afford": available >= cost and refusing is None,
                "cost": cost,
                "balance": available,
                "deficit": max(0, cost - available),
            }
            if refusing is not None:
                out["limit"] = refusing
            return out

        return self._atomic(run)

    def list_grants(self, now: datetime, user_id: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            if self._account(user_id).pool_id is not None:
                # silent: a member holds no grants (tokens.grants of a member lists its own)
                return {"success": True, "grants": [], "debt": 0}
            account = self._lock(user_id, now)
            active = sorted(
                (g for g in self.user_grants(user_id) if g.status == "active"),
                key=Grant.burn_key,
            )
            return {"success": True, "grants": [g.id for g in active], "debt": account.debt}

        return self._atomic(run)

    def entries_read(self, now: datetime, user_id: str) -> list[Entry]:
        """``ledger.user_entries``' entries, newest first. A read counts a due grant as expired:
        silent: it writes their expiry entries first, as the worker's balance reads do."""
        if user_id in self.accounts:
            pool = self._lock(user_id, now)
            if pool.user_id != user_id:  # a member's: the entries it spent
                spent = [e for e in self.user_entries(pool.user_id) if e.spent_by == user_id]
                return list(reversed(spent))
        return list(reversed(self.user_entries(user_id)))

    def _cost(self, operation_type: str) -> int:
        if operation_type not in PRICES:
            raise Refused("UNKNOWN_OPERATION_TYPE", f"Unknown operation type: {operation_type}")
        return PRICES[operation_type]

    def _price(self, operation_type: str) -> int:
        cost = self._cost(operation_type)
        if cost == 0:
            raise Refused("NOT_CHARGEABLE", f"Operation type {operation_type} has no cost")
        return cost

    # --- spend limits (v1.2) ----------------------------------------------------------------

    def _chain(self, user_id: str) -> list[str]:
        """``user_id``, then its parent, up to its pool."""
        chain = [user_id]
        while (parent := self.accounts[chain[-1]].parent_id) is not None:
            chain.append(parent)
        return chain

    def _under(self, spender: str, user_id: str) -> bool:
        """Whether ``spender`` is ``user_id`` or an account below it."""
        return user_id in self._chain(spender)

    def _used(self, limit: Limit, now: datetime) -> tuple[int, datetime | None]:
        """What ``limit``'s account and those below it used in the window holding ``now``:
        spends of entries made in it less refunds of those entries, plus every active hold
        not past its end, whenever made. And the oldest spend still counted."""
        if limit.rolling:
            span = ROLLING_SPANS[limit.period]

            def within(t: datetime) -> bool:
                return now - span < t <= now
        else:
            start, end = calendar_window(limit.period, now)

            def within(t: datetime) -> bool:
                return start <= t < end

        pool = self._pool(limit.user_id).user_id
        spends = [
            s
            for s in self.counted.values()
            if s.pool == pool and within(s.created_at) and self._under(s.spender, limit.user_id)
        ]
        held = sum(
            h.amount
            for h in self.holds.values()
            if h.user_id == pool
            and h.status == "active"
            and h.expires_at > now
            and self._under(h.spender, limit.user_id)
        )
        oldest = min((s.created_at for s in spends if s.net > 0), default=None)
        return sum(s.net for s in spends) + held, oldest

    def _listed(self, limit: Limit, now: datetime) -> dict[str, Any]:
        used, oldest = self._used(limit, now)
        if limit.rolling:
            resets_at = None if oldest is None else oldest + ROLLING_SPANS[limit.period]
        else:
            resets_at = calendar_window(limit.period, now)[1]
        return {
            "user_id": limit.user_id,
            "name": limit.name,
            "max_tokens": limit.max_tokens,
            "period": limit.period,
            "rolling": limit.rolling,
            "used": used,
            "remaining": max(0, limit.max_tokens - used),
            "resets_at": resets_at,
        }

    def _applying(self, user_id: str, now: datetime) -> list[dict[str, Any]]:
        """Every limit that applies to ``user_id``: its own, then its parent's, up to the pool,
        each account's by name (silent: by code point, as the worker orders them)."""
        out = []
        for account in self._chain(user_id):
            for name in sorted(self.limits.get(account, {})):
                out.append(self._listed(self.limits[account][name], now))
        return out

    def _refusing(self, spender: str, requested: int, now: datetime) -> dict[str, Any] | None:
        """The first limit (in ``tokens.limits`` order) that ``requested`` more spent or held
        would take past its ``max_tokens``."""
        for listed in self._applying(spender, now):
            if listed["used"] + requested > listed["max_tokens"]:
                return listed
        return None

    def _check_limits(self, spender: str, requested: int, now: datetime) -> None:
        listed = self._refusing(spender, requested, now)
        if listed is not None:
            raise limit_exceeded(listed, requested)

    def set_limit(
        self,
        now: datetime,
        user_id: str,
        name: str,
        max_tokens: int | None,
        period: str | None,
        rolling: bool = False,
    ) -> dict[str, Any]:
        """``tokens.set_limit``: set (``max_tokens=None``: remove) the limit ``name``; the
        account's own limits after."""

        def run() -> dict[str, Any]:
            if not 1 <= len(name) <= 64:
                raise Refused("VALIDATION_ERROR", "name: 1-64 characters")
            if max_tokens is not None:
                if not 0 <= max_tokens <= MAX_AMOUNT:
                    raise Refused("VALIDATION_ERROR", "max_tokens: 0 to 10^12")
                if period not in ROLLING_SPANS:
                    raise Refused("VALIDATION_ERROR", "period: minute, hour, day, week or month")
            # silent: setting a limit takes the pool's lock, which expires its due grants first
            # (as a movement's does).
            self._lock(user_id, now)
            own = self.limits.setdefault(user_id, {})
            if max_tokens is None:
                own.pop(name, None)  # silent: removing an unknown name is no error
            else:
                if name not in own and len(own) >= MAX_LIMITS:
                    raise Refused("VALIDATION_ERROR", "name: at most 8 limits per account")
                assert period is not None
                own[name] = Limit(user_id, name, max_tokens, period, rolling)
            listed = [x for x in self._applying(user_id, now) if x["user_id"] == user_id]
            return {"success": True, "user_id": user_id, "limits": listed}

        return self._atomic(run)

    def limits_read(self, now: datetime, user_id: str) -> dict[str, Any]:
        """``tokens.limits``: every limit that applies to the account (silent: a read that
        takes no lock, so it expires nothing)."""

        def run() -> dict[str, Any]:
            self._account(user_id)
            return {"success": True, "user_id": user_id, "limits": self._applying(user_id, now)}

        return self._atomic(run)

    # --- movements ----------------------------------------------------------------------------

    def _spend_movement(
        self,
        now: datetime,
        user_id: str,
        amount: int,
        kind: str,
        operation_type: str,
        allow_overdraft: bool,
        metadata: dict[str, Any],
        key: str | None,
    ) -> dict[str, Any]:
        account = self._lock(user_id, now)
        available = account.balance - account.reserved
        if not allow_overdraft and available < amount:
            raise insufficient(amount, available)
        self._check_limits(user_id, amount, now)  # overdraft or not
        change = _Change()
        self._spend(account, change, amount, now, into_debt=True)
        entry = self._write(
            account,
            change,
            now,
            kind=kind,
            operation_type=operation_type,
            spent_delta=amount,
            metadata=metadata,
            key=key,
            spent_by=self._spender(account, user_id),
        )
        return self._movement(account, entry)

    def debit(
        self,
        now: datetime,
        user_id: str,
        amount: int,
        operation_type: str,
        allow_overdraft: bool = False,
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        meta = metadata or {}

        def run() -> dict[str, Any]:
            if amount <= 0:
                raise invalid_amount("Debit")
            self._cost(operation_type)
            request = ("debit", amount, operation_type, allow_overdraft, repr(meta))
            return self._keyed_spend(
                now, user_id, key, request, amount, operation_type, allow_overdraft, meta
            )

        return self._atomic(run)

    def _keyed_spend(
        self,
        now: datetime,
        user_id: str,
        key: str | None,
        request: tuple[Any, ...],
        amount: int,
        operation_type: str,
        allow_overdraft: bool,
        meta: dict[str, Any],
    ) -> dict[str, Any]:
        """A debit (``request[0]``) or charge under its key."""
        kind = str(request[0])
        return self._keyed(
            user_id,
            key,
            request,
            lambda: self._spend_movement(
                now, user_id, amount, kind, operation_type, allow_overdraft, meta, key
            ),
        )

    def charge(
        self,
        now: datetime,
        user_id: str,
        operation_type: str,
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        meta = metadata or {}

        def run() -> dict[str, Any]:
            cost = self._price(operation_type)
            request = ("charge", operation_type, repr(meta))
            return self._keyed_spend(now, user_id, key, request, cost, operation_type, False, meta)

        return self._atomic(run)

    def credit(
        self,
        now: datetime,
        user_id: str,
        amount: int,
        operation_type: str = "purchase",
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
        grant_kind: str = "purchased",
        expires_at: datetime | None = None,
        priority: int | None = None,
    ) -> dict[str, Any]:
        meta = metadata or {}

        def apply() -> dict[str, Any]:
            account = self._lock(user_id, now)
            if account.user_id != user_id:
                raise member_account(account.user_id)
            if expires_at is not None and expires_at <= now:
                raise Refused(
                    "VALIDATION_ERROR", "Invalid arguments: expires_at: must be in the future"
                )
            change = _Change()
            self._grant(account, change, grant_kind, amount, now, priority, expires_at)
            entry = self._write(
                account,
                change,
                now,
                kind="credit",
                operation_type=operation_type,
                metadata=meta,
                key=key,
            )
            return self._movement(account, entry)

        def run() -> dict[str, Any]:
            if amount <= 0:
                raise invalid_amount("Credit")
            self._cost(operation_type)
            request = (
                "credit",
                amount,
                operation_type,
                repr(meta),
                grant_kind,
                expires_at,
                priority,
            )
            return self._keyed(user_id, key, request, apply)

        return self._atomic(run)

    def refund(
        self,
        now: datetime,
        user_id: str,
        amount: int,
        reason: str | None = None,
        original_entry_id: int | None = None,
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        meta = with_reason(metadata, reason)

        def apply() -> dict[str, Any]:
            already = 0
            original: Entry | None = None
            # silent: an unknown user with an original entry: USER_NOT_FOUND first.
            pool = self._pool(user_id)
            if original_entry_id is not None:
                original = self.entries.get(original_entry_id)
                if (
                    original is None
                    or original.user_id != pool.user_id
                    or (pool.user_id != user_id and original.spent_by != user_id)
                    or original.kind not in REFUNDABLE
                ):
                    raise Refused("ENTRY_NOT_FOUND", "Original entry not found")
                charged = -original.amount
                already = self.refunded.get(original.id, 0)
                if already + amount > charged:
                    raise Refused(
                        "REFUND_EXCEEDS_ORIGINAL",
                        f"Refund exceeds original charge. Charged: {charged}, Refunded: {already}",
                    )
            account = self._lock(user_id, now)
            change = _Change()
            ended: list[tuple[Grant, int]] = []
            if original is None:
                self._grant(account, change, "adjustment", amount, now)
            else:
                self.refunded[original.id] = already + amount
                if original.id in self.counted:  # a refund of a spend gives back what it counted
                    self.counted[original.id].refunded += amount
                ended = self._put_back(account, change, original, already, amount, now)
            entry = self._write(
                account,
                change,
                now,
                kind="refund",
                operation_type="refund",
                spent_delta=-amount,
                metadata=meta,
                key=key,
                original=None if original is None else original.id,
                spent_by=self._spender(account, user_id),
            )
            out = self._movement(account, entry)
            # A refund never revives an ended grant: what went back into one leaves again.
            for grant, tokens in ended:
                self._expire_grant(account, grant, tokens, now)
            return out

        def run() -> dict[str, Any]:
            if amount <= 0:
                raise invalid_amount("Refund")
            request = ("refund", amount, original_entry_id, repr(meta))
            return self._keyed(user_id, key, request, apply)

        return self._atomic(run)

    def _put_back(
        self,
        account: Account,
        change: _Change,
        original: Entry,
        already: int,
        amount: int,
        now: datetime,
    ) -> list[tuple[Grant, int]]:
        """Tokens go back where the entry took them, last taken first: its debt part (taken
        after every grant), then its grants in reverse order; past what is left of them (after
        ``already`` refunded), a new adjustment grant."""
        taken = [(g, -a) for g, a in original.splits if a < 0]
        from_grants = sum(t for _, t in taken)
        sources: list[tuple[int | None, int]] = [(None, -original.amount - from_grants)]
        sources += [(g, t) for g, t in reversed(taken)]
        skip, left = already, amount
        ended: list[tuple[Grant, int]] = []
        for grant_id, took in sources:
            if skip >= took:
                skip -= took
                continue
            share = min(took - skip, left)
            skip = 0
            left -= share
            if grant_id is None:
                debt = account.debt + change.debt_delta
                paid = min(debt, share)
                change.debt_delta -= paid
                if share > paid:
                    self._grant(account, change, "adjustment", share - paid, now)
            else:
                grant = self.grants[grant_id]
                was_ended = grant.status == "expired" or grant.ended_by(now)
                grant.remaining += share
                grant.returned += share
                if grant.status == "depleted":
                    grant.status = "active"
                change.add(grant_id, share)
                if was_ended:
                    ended.append((grant, share))
            if left == 0:
                break
        if left:
            self._grant(account, change, "adjustment", left, now)
        return ended

    def reset_balance(
        self,
        now: datetime,
        user_id: str,
        new_balance: int,
        reason: str | None = None,
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        meta = with_reason(metadata, reason)

        def apply() -> dict[str, Any]:
            account = self._lock(user_id, now)
            if account.user_id != user_id:
                raise member_account(account.user_id)
            if new_balance < account.reserved:
                raise Refused(
                    "BELOW_RESERVED",
                    f"Balance cannot go below reserved tokens. Reserved: {account.reserved}",
                )
            change = _Change()
            delta = new_balance - account.balance
            if delta > 0:
                self._grant(account, change, "adjustment", delta, now)
            elif delta < 0:
                self._spend(account, change, -delta, now, into_debt=False)
            entry = self._write(
                account,
                change,
                now,
                kind="adjustment",
                operation_type="adjustment",
                metadata=meta,
                key=key,
            )
            return self._movement(account, entry)

        def run() -> dict[str, Any]:
            if new_balance < 0:
                raise Refused("NEGATIVE_BALANCE", "Balance cannot be negative")
            return self._keyed(user_id, key, ("reset_balance", new_balance, repr(meta)), apply)

        return self._atomic(run)

    # --- reservations ---------------------------------------------------------------------------

    def reserve(
        self,
        now: datetime,
        reservation_id: str,
        user_id: str,
        amount: int | None = None,
        operation_type: str | None = None,
        ttl_seconds: int = 900,
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
        overcapture_limit: int = 0,
    ) -> dict[str, Any]:
        meta = metadata or {}

        def apply(need: int) -> dict[str, Any]:
            account = self._lock(user_id, now)
            available = account.balance - account.reserved
            if available < need:
                raise insufficient(need, available)
            self._check_limits(user_id, need, now)
            hold = Hold(
                id=reservation_id,
                user_id=account.user_id,
                spent_by=self._spender(account, user_id),
                amount=0,
                operation_type=operation_type,
                expires_at=now + timedelta(seconds=ttl_seconds),
                created_at=now,
                overcapture_limit=overcapture_limit,
                metadata=dict(meta),
            )
            self._hold_more(hold, need, now)
            self.holds[hold.id] = hold
            account.reserved += need
            return {
                "success": True,
                "reservation_id": reservation_id,
                "amount": need,
                "expires_at": hold.expires_at,
                "tokens_available": account.balance - account.reserved,
            }

        def run() -> dict[str, Any]:
            if amount is not None and amount <= 0:
                raise invalid_amount("Reserve")
            if amount is None:
                assert operation_type is not None
                need = self._price(operation_type)
            else:
                need = amount
                if operation_type is not None:
                    self._cost(operation_type)
            request = (
                "reserve",
                need,
                operation_type,
                ttl_seconds,
                repr(meta),
                overcapture_limit,
            )
            return self._keyed(user_id, key, request, lambda: apply(need))

        return self._atomic(run)

    def _hold_status(self, hold: Hold, now: datetime) -> str:
        if hold.status == "active" and hold.expires_at <= now:
            return "expired"
        return hold.status

    def _unhold(self, hold: Hold) -> None:
        for gid, tokens in hold.grants.items():
            self.grants[gid].held -= tokens

    def capture(
        self,
        now: datetime,
        reservation_id: str,
        amount: int | None = None,
        metadata: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        meta = metadata or {}

        def apply(hold: Hold) -> dict[str, Any]:
            if (status := self._hold_status(hold, now)) != "active":
                raise not_active(status)
            captured = hold.amount if amount is None else amount
            if captured > hold.amount + hold.overcapture_limit:
                raise Refused(
                    "CAPTURE_EXCEEDS_RESERVATION",
                    "Capture exceeds reservation. "
                    f"Reserved: {hold.amount + hold.overcapture_limit}, Requested: {captured}",
                )
            hold.status = "captured"
            account = self._lock(hold.user_id, now)
            change = _Change()
            left = captured
            for gid in sorted(hold.grants, key=lambda g: self.grants[g].burn_key()):
                held = hold.grants[gid]
                grant = self.grants[gid]
                take = min(held, left)
                grant.remaining -= take
                grant.spent += take
                grant.held -= held
                if take and grant.remaining == 0:
                    grant.status = "depleted"
                if take:
                    change.add(gid, -take)
                left -= take
            shortfall = self._spend(account, change, left, now, into_debt=True) if left else 0
            account.reserved -= hold.amount
            op = hold.operation_type or "capture"
            entry = self._write(
                account,
                change,
                now,
                kind="capture",
                operation_type=op,
                spent_delta=captured,
                metadata={**hold.metadata, **meta, "reservation_id": reservation_id},
                key=key,
                spent_by=hold.spent_by,
            )
            out = {
                **self._movement(account, entry),
                "overcaptured": max(0, captured - hold.amount),
                "shortfall": shortfall,
            }
            # Held tokens of a grant that ended meanwhile, not captured, leave with it now.
            self._expire_due(account, now)
            return out

        def run() -> dict[str, Any]:
            if amount is not None and amount <= 0:
                raise invalid_amount("Capture")
            hold = self.holds.get(reservation_id)
            if hold is None:
                raise Refused("RESERVATION_NOT_FOUND", "Reservation not found")
            request = ("capture", reservation_id, amount, repr(meta))
            return self._keyed(hold.spender, key, request, lambda: apply(hold))

        return self._atomic(run)

    def release(
        self, now: datetime, reservation_id: str, reason: str | None = None, key: str | None = None
    ) -> dict[str, Any]:
        def apply(hold: Hold) -> dict[str, Any]:
            # silent: a release of an active hold past its expires_at (not yet swept) is allowed.
            if hold.status != "active":
                raise not_active(hold.status)
            hold.status = "released"
            account = self._account(hold.user_id)
            self._unhold(hold)
            account.reserved -= hold.amount
            self._expire_due(account, now)
            return {"success": True, "reservation_id": reservation_id, "status": "released"}

        def run() -> dict[str, Any]:
            hold = self.holds.get(reservation_id)
            if hold is None:
                raise Refused("RESERVATION_NOT_FOUND", "Reservation not found")
            request = ("release", reservation_id, reason)
            return self._keyed(hold.spender, key, request, lambda: apply(hold))

        return self._atomic(run)

    def extend(
        self,
        now: datetime,
        reservation_id: str,
        amount: int = 0,
        ttl_seconds: int | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """Hold ``amount`` more (of available tokens, in burn order) and/or move the end to now
        + ``ttl_seconds``, never past 7 days after the hold was made."""

        def apply(hold: Hold) -> dict[str, Any]:
            if hold.status != "active":
                raise not_active(hold.status)
            account = self._lock(hold.user_id, now)
            if hold.expires_at <= now:
                raise not_active("expired")
            available = account.balance - account.reserved
            if amount and available < amount:
                raise insufficient(amount, available)
            if amount:
                self._check_limits(hold.spender, amount, now)
            if ttl_seconds is not None:
                # The contract moves the end to now + ttl_seconds; an extension never ends a
                # hold sooner (decided in issue 21: a user extends a hold to keep it alive).
                moved = min(now + timedelta(seconds=ttl_seconds), hold.created_at + MAX_HOLD)
                hold.expires_at = max(moved, hold.expires_at)
            self._hold_more(hold, amount, now)
            account.reserved += amount
            return {
                "success": True,
                "reservation_id": reservation_id,
                "amount": hold.amount,
                "expires_at": hold.expires_at,
                "tokens_available": account.balance - account.reserved,
            }

        def run() -> dict[str, Any]:
            hold = self.holds.get(reservation_id)
            if hold is None:
                raise Refused("RESERVATION_NOT_FOUND", "Reservation not found")
            request = ("extend", reservation_id, amount, ttl_seconds)
            return self._keyed(hold.spender, key, request, lambda: apply(hold))

        return self._atomic(run)

    def _hold_more(self, hold: Hold, amount: int, now: datetime) -> None:
        """Hold ``amount`` more of the user's free tokens, in burn order."""
        left = amount
        for g in self._free(hold.user_id, now):
            if left == 0:
                break
            take = min(g.remaining - g.held, left)
            g.held += take
            hold.grants[g.id] = hold.grants.get(g.id, 0) + take
            left -= take
        assert left == 0, "a hold beyond the free tokens"
        hold.amount += amount

    def expire_reservations(self, now: datetime) -> dict[str, Any]:
        """``reservations.expire``: every active hold past its end ends; no entry (what it
        frees of a due grant waits for that grant's expiry)."""
        expired = 0
        for hold in self.holds.values():
            if hold.status == "active" and hold.expires_at <= now:
                hold.status = "expired"
                self._unhold(hold)
                self.accounts[hold.user_id].reserved -= hold.amount
                expired += 1
        return {"success": True, "expired": expired}

    def expire_grants(self, now: datetime) -> dict[str, Any]:
        grants = tokens = 0
        for user_id in sorted(self.accounts):
            g, t = self._expire_due(self.accounts[user_id], now)
            grants += g
            tokens += t
        return {"success": True, "expired": grants, "tokens_expired": tokens}

    # --- renewals -------------------------------------------------------------------------------

    def _due(self, account: Account, now: datetime) -> bool:
        rule = self.tiers[account.tier]
        if self._lapsed(account, now) or account.pool_id is not None:  # members: never
            return False
        if account.last_renewal_at is None:
            return True
        # whole UTC days: due on the period's day after the last renewal's day
        return midnight(now) >= midnight(account.last_renewal_at) + timedelta(days=rule.period_days)

    def _lapsed(self, account: Account, now: datetime) -> bool:
        return (
            account.tier not in FREE_TIERS
            and account.subscription_expires_at is not None
            and account.subscription_expires_at <= now
        )

    def _renew(self, account: Account, now: datetime, source: str) -> dict[str, Any]:
        rule = self.tiers[account.tier]
        account.last_renewal_at = now
        self._expire_due(account, now)
        before = account.balance
        expired = rolled = 0
        ends = None
        if rule.renewal == "reset":
            ends = midnight(now) + timedelta(days=rule.period_days + 1)
            expired, rolled = self._reset(account, rule.rollover_max, ends, now)
        change = _Change()
        if rule.tokens:
            self._grant(account, change, "allowance", rule.tokens, now, expires_at=ends)
        self._write(
            account,
            change,
            now,
            kind="monthly_reset",
            operation_type="monthly_reset",
            metadata={"tier": account.tier, "source": source},
        )
        return {
            "success": True,
            "user_id": account.user_id,
            "tier": account.tier,
            "tokens_added": rule.tokens,
            "previous_balance": before,
            "new_balance": account.balance,
            "renewal_date": now,
            "tokens_expired": expired,
            "tokens_rolled_over": rolled,
        }

    def _reset(
        self, account: Account, rollover_max: int, ends: datetime, now: datetime
    ) -> tuple[int, int]:
        old = sorted(
            (
                g
                for g in self.user_grants(account.user_id)
                if g.status == "active" and g.kind in ("allowance", "rollover")
            ),
            key=lambda g: g.id,
        )
        if not old:
            return 0, 0
        change = _Change()
        base = 0
        for g in old:
            left = g.remaining - g.held
            if g.kind == "allowance" and not g.ended_by(now):
                base += left
            if g.expires_at is None or g.expires_at > now:
                g.expires_at = now
            if left > 0:
                g.remaining -= left
                g.expired += left
                change.add(g.id, -left)
            if g.held == 0:
                g.status = "expired"
        if not change.splits:
            return 0, 0
        expired = -sum(a for _, a in change.splits)
        rolled = min(base, rollover_max)
        if rolled:
            roll = Grant(
                id=self._next_id(),
                user_id=account.user_id,
                kind="rollover",
                amount=rolled,
                remaining=rolled,
                priority=DEFAULT_PRIORITY["rollover"],
                expires_at=ends,
                created_at=now,
            )
            self.grants[roll.id] = roll
            change.add(roll.id, rolled)
        self._write(
            account,
            change,
            now,
            kind="expiry",
            operation_type="expiry",
            metadata={"grant_id": change.splits[0][0], "reason": "renewal"},
        )
        return expired, rolled

    def renew_user(self, now: datetime, user_id: str, key: str | None = None) -> dict[str, Any]:
        def apply() -> dict[str, Any]:
            account = self._account(user_id)
            if account.pool_id is not None:
                raise member_account(account.pool_id)
            if self._lapsed(account, now):
                raise Refused("SUBSCRIPTION_EXPIRED", "Subscription expired")
            if not self._due(account, now):
                raise Refused(
                    "NOT_DUE", f"Next renewal in {self.days_until_renewal(account, now)} days"
                )
            return self._renew(account, now, "renew_user")

        return self._atomic(lambda: self._keyed(user_id, key, ("renew_user",), apply))

    def days_until_renewal(self, account: Account, now: datetime) -> int:
        if account.last_renewal_at is None:
            return 0
        rule = self.tiers[account.tier]
        next_date = midnight(account.last_renewal_at) + timedelta(days=rule.period_days)
        return max(0, (next_date.date() - now.date()).days)

    def _due_users(self, now: datetime, tier: str | None, limit: int | None) -> list[Account]:
        """Due users, those due longest first (never renewed, by id; then oldest renewal)."""
        if tier is not None:
            self._tier(tier)
        due = [
            a
            for a in self.accounts.values()
            if (tier is None or a.tier == tier) and self._due(a, now)
        ]
        due.sort(
            key=lambda a: (
                a.last_renewal_at is not None,
                a.last_renewal_at or now,
                a.user_id,
            )
        )
        return due if limit is None else due[:limit]

    def sweep(
        self,
        now: datetime,
        tier: str | None = None,
        limit: int | None = None,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """``renewals.sweep``: renews every due user (at most ``limit``); a dry run changes
        nothing and answers the same counts."""

        def run() -> dict[str, Any]:
            due = self._due_users(now, tier, limit)
            if not dry_run:
                for account in due:
                    self._renew(account, now, "sweep")
            return {
                "success": True,
                "total_processed": len(due),
                "successful": len(due),
                "failed": 0,
                "skipped": 0,
                "errors": [],
            }

        return self._atomic(run)

    def due(
        self, now: datetime, tier: str | None = None, limit: int | None = None
    ) -> dict[str, Any]:
        return self._atomic(
            lambda: {
                "success": True,
                "user_ids": [a.user_id for a in self._due_users(now, tier, limit)],
            }
        )

    def check_eligibility(self, now: datetime, user_id: str) -> dict[str, Any]:
        def run() -> dict[str, Any]:
            account = self._account(user_id)
            if account.pool_id is not None:  # members are never due: renewals are the pool's
                raise member_account(account.pool_id)
            last = account.last_renewal_at
            rule = self.tiers[account.tier]
            next_date = None if last is None else midnight(last) + timedelta(days=rule.period_days)
            days = self.days_until_renewal(account, now)
            # silent: the reasons of an eligible user (the code's words)
            if self._lapsed(account, now):
                eligible, reason = False, "Subscription expired"
            elif last is None:
                eligible, reason = True, "Never renewed"
            elif self._due(account, now):
                eligible, reason = True, "Renewal due"
            else:
                eligible, reason = False, f"Next renewal in {days} days"
            return {
                "success": True,
                "user_id": user_id,
                "eligible": eligible,
                "reason": reason,
                "next_renewal_date": next_date,
                "days_until_renewal": days,
            }

        return self._atomic(run)

    # --- ledger maintenance -----------------------------------------------------------------

    def delete_old_entries(self, older_than: datetime) -> dict[str, Any]:
        """Entries created before ``older_than`` go; each user who had any (other than an
        earlier carried_forward) keeps one carried_forward entry of their sum."""
        deleted = 0
        for user_id in sorted(self.accounts):
            old = [e for e in self.user_entries(user_id) if e.created_at < older_than]
            counted = [e for e in old if e.kind != CARRIED_FORWARD]
            if not counted:
                continue
            deleted += len(counted)
            total = sum(e.amount for e in old)
            per_grant: dict[int, int] = {}
            entries = 0
            for e in old:
                entries += int(e.metadata.get("entries", 1)) if e.kind == CARRIED_FORWARD else 1
                for gid, amount in e.splits:
                    per_grant[gid] = per_grant.get(gid, 0) + amount
                del self.entries[e.id]
                self.refunded.pop(e.id, None)
            carried = Entry(
                id=self._next_id(),
                user_id=user_id,
                kind=CARRIED_FORWARD,
                operation_type=CARRIED_FORWARD,
                amount=total,
                before=0,
                after=total,
                created_at=max(e.created_at for e in old),
                metadata={"entries": entries, "older_than": older_than.isoformat()},
                splits=sorted((g, a) for g, a in per_grant.items() if a != 0),
            )
            self.entries[carried.id] = carried
        return {"success": True, "deleted": deleted}
