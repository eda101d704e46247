"""SQLAlchemy tables. The schema itself is created only by the Alembic migrations."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    TypeDecorator,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always UTC-aware in Python, whatever the backend stores."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: every timestamp must carry a timezone")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JSONType = JSON().with_variant(JSONB(), "postgresql")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """This host's clock. Timestamps the ledger writes come from the database instead
    (``accounting/clock.py``), so the columns have no Python-side default."""
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Account(Base):
    __tablename__ = "accounts"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tier: Mapped[str] = mapped_column(String(64))
    tokens_balance: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_spent: Mapped[int] = mapped_column(BigInteger, default=0)
    # What no grant covers (an allowed overdraft, an over-capture): the next grant pays it first.
    debt: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    last_renewal_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    subscription_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # Pools (contract v1.2): a member's parent and the pool at the top of its tree, both fixed
    # when it is opened (NULL for a pool, which every account outside a tree is). A member's
    # balance, grants, holds and ledger are its pool's.
    parent_id: Mapped[str | None] = mapped_column(String(128), ForeignKey("accounts.user_id"))
    pool_id: Mapped[str | None] = mapped_column(String(128))
    # On a pool: whether some account of its tree has a spend limit (movements skip the limits'
    # tables otherwise).
    limited: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")
    # On a member: what the active reservations it and the accounts below it made hold (a
    # pool's is its tokens_reserved).
    subtree_held: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The seq of the user's last event (sql/events/tokens_event.sql), and whether the account has
    # alerts or an auto top-up to decide at each change's commit (tokens_alerts).
    events_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    watched: Mapped[bool] = mapped_column(Boolean, default=False, server_default="false")

    __table_args__ = (
        CheckConstraint("tokens_reserved >= 0", name="reserved_not_negative"),
        CheckConstraint("subtree_held >= 0", name="subtree_held_not_negative"),
        Index("ix_accounts_pool", "pool_id", postgresql_where=text("pool_id IS NOT NULL")),
        CheckConstraint("tokens_spent >= 0", name="spent_not_negative"),
        CheckConstraint("debt >= 0", name="debt_not_negative"),
        # The renewal sweep pages through due users of a tier, oldest renewal first.
        Index("ix_accounts_tier_last_renewal", "tier", "last_renewal_at", "user_id"),
        # Users in debt (few): the total debt a scrape reads follows them, not all accounts.
        Index(
            "ix_accounts_in_debt",
            "user_id",
            "debt",
            postgresql_where=text("debt > 0"),
        ),
    )


class LedgerEntry(Base):
    """Append-only: a row is written once, in the transaction that moves the balance.

    Partitioned by month of ``created_at`` (migration 0036, sql/ledger/tokens_ledger_months.sql),
    so its key holds ``created_at``; ``id`` alone is unique all the same (one sequence) and is
    what the ORM identifies an entry by."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(128), ForeignKey("accounts.user_id"))
    # What kind of movement wrote it (debit, charge, capture, credit, refund, adjustment,
    # renewal, carried_forward): refunds may only point at debits, charges and captures.
    kind: Mapped[str] = mapped_column(String(32))
    operation_type: Mapped[str] = mapped_column(String(64))
    tokens_amount: Mapped[int] = mapped_column(BigInteger)
    balance_before: Mapped[int] = mapped_column(BigInteger)
    balance_after: Mapped[int] = mapped_column(BigInteger)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    original_entry_id: Mapped[int | None] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    # The member that made the movement, in its pool's ledger (NULL: the account's own).
    spent_by: Mapped[str | None] = mapped_column(String(128))
    # The user's hash chain (sql/ledger/tokens_chain.sql sets both on insert).
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))

    __table_args__ = (
        CheckConstraint("balance_after = balance_before + tokens_amount", name="arithmetic"),
        # A member's history (ledger reads of a member cover the entries it spent).
        Index(
            "ix_ledger_entries_spent_by",
            "spent_by",
            "created_at",
            "id",
            postgresql_where=text("spent_by IS NOT NULL"),
        ),
        Index("ix_ledger_entries_user_created", "user_id", "created_at", "id"),
        Index("ix_ledger_entries_type_created", "operation_type", "created_at", "id"),
        # With id: a key check of entries stamped at one instant (a batch, the checkpoints of a
        # month dropped) probes one entry, not all of that instant's (PostgreSQL's generic plan
        # for the splits' foreign key picks this index).
        Index("ix_ledger_entries_created", "created_at", "id"),
        Index(
            "ix_ledger_entries_original",
            "original_entry_id",
            postgresql_where=text("original_entry_id IS NOT NULL"),
        ),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )
    __mapper_args__ = {"primary_key": [id]}  # noqa: RUF012


class IdempotencyRecord(Base):
    """The first outcome of each (user, key): written in the same transaction as its effect.

    Kept apart from the ledger so pruning old entries never lets an old key apply twice.
    """

    __tablename__ = "idempotency_records"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    response: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    # Retention deletes the oldest records first.
    __table_args__ = (Index("ix_idempotency_records_created", "created_at"),)


class RefundTotal(Base):
    """What has been refunded against one debit, charge or capture, and what it charged.

    The refund cap lives here, not in a sum over refund entries, so pruning old entries (which
    may remove a refund and keep its debit) can never reset it.
    """

    __tablename__ = "refund_totals"

    entry_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    entry_created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    user_id: Mapped[str] = mapped_column(String(128))
    charged: Mapped[int] = mapped_column(BigInteger)
    refunded: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("refunded >= 0 AND refunded <= charged", name="within_charge"),
        # A cap lives as long as its entry: a prune that removes the entry removes its cap
        # (a month dropped whole, tokens_prune_months, removes its caps first).
        ForeignKeyConstraint(
            ["entry_id", "entry_created_at"],
            ["ledger_entries.id", "ledger_entries.created_at"],
            ondelete="CASCADE",
            onupdate="CASCADE",
        ),
        Index("ix_refund_totals_entry_created_at", "entry_created_at"),
    )


class Sweep(Base):
    """A renewal sweep's plan, fixed when it is first planned: a redelivered sweep message
    republishes the same chunks and reports the same totals. Deleted after a retention period."""

    __tablename__ = "sweeps"

    sweep_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    # The eligibility instant (the database clock, read once) and the tiers' plans at it.
    as_of: Mapped[datetime] = mapped_column(UTCDateTime)
    tiers: Mapped[list[dict[str, Any]]] = mapped_column(JSONType)
    continue_on_error: Mapped[bool] = mapped_column(Boolean)
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    # Set by the first failed renewal when continue_on_error is off: later chunks do nothing.
    stopped: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)

    __table_args__ = (Index("ix_sweeps_created", "created_at"),)


class SweepChunk(Base):
    """One chunk of a sweep: a keyset range of due users, and its tally once it has run.

    The tally is written in the transaction that renews the chunk, so a redelivered chunk
    replays it instead of renewing anyone twice.
    """

    __tablename__ = "sweep_chunks"

    sweep_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("sweeps.sweep_id", ondelete="CASCADE"), primary_key=True
    )
    chunk_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    phase: Mapped[str] = mapped_column(String(16))
    # The range in sweep order: after (exclusive) up to (inclusive) these keys.
    after_user: Mapped[str] = mapped_column(String(128))
    after_time: Mapped[datetime] = mapped_column(UTCDateTime)
    upto_user: Mapped[str] = mapped_column(String(128))
    upto_time: Mapped[datetime] = mapped_column(UTCDateTime)
    planned: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="planned")
    successful: Mapped[int] = mapped_column(Integer, default=0)
    skipped: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[dict[str, str]]] = mapped_column(JSONType, default=list)
    # Rows another transaction held: renewed after the chunk's own commit, then cleared.
    contested: Mapped[list[str] | None] = mapped_column(JSONType)

    __table_args__ = (
        CheckConstraint(
            "status IN ('planned', 'contested', 'done', 'stopped')", name="status_known"
        ),
        CheckConstraint("phase IN ('never', 'lapsed')", name="phase_known"),
    )


class Reservation(Base):
    __tablename__ = "reservations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), ForeignKey("accounts.user_id"))
    amount: Mapped[int] = mapped_column(BigInteger)
    operation_type: Mapped[str | None] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="active")
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    settled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    captured_amount: Mapped[int | None] = mapped_column(BigInteger)
    ledger_entry_id: Mapped[int | None] = mapped_column(BigInteger)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSONType, default=dict)
    # How far past ``amount`` a capture may go (contract v1.1 settlement).
    overcapture_limit: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The member that made it; ``user_id`` is the pool whose grants it holds (NULL: its own).
    spent_by: Mapped[str | None] = mapped_column(String(128))

    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("overcapture_limit >= 0", name="overcapture_not_negative"),
        CheckConstraint(
            "status IN ('active', 'captured', 'released', 'expired')", name="status_known"
        ),
        Index(
            "ix_reservations_active_expiry",
            "expires_at",
            postgresql_where=text("status = 'active'"),
        ),
        Index("ix_reservations_user", "user_id"),
    )


class Grant(Base):
    """Where a balance's tokens came from and when they end (contract v1.1).

    A user's grants change only under the user's account row lock, so the account row
    serialises every burn-down, hold, refund and expiry of them.
    ``remaining = amount - spent - expired + returned`` is not a constraint on purpose:
    ``ledger.reconcile`` checks it, and a write that forgot a counter is then found.
    """

    __tablename__ = "grants"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(String(128), ForeignKey("accounts.user_id"))
    kind: Mapped[str] = mapped_column(String(16))
    amount: Mapped[int] = mapped_column(BigInteger)
    remaining: Mapped[int] = mapped_column(BigInteger)
    # What active reservations hold of ``remaining``: neither spendable nor expirable.
    held: Mapped[int] = mapped_column(BigInteger, default=0)
    spent: Mapped[int] = mapped_column(BigInteger, default=0)
    expired: Mapped[int] = mapped_column(BigInteger, default=0)
    returned: Mapped[int] = mapped_column(BigInteger, default=0)
    priority: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint(
            "kind IN ('allowance', 'rollover', 'purchased', 'promo', 'adjustment')",
            name="kind_known",
        ),
        CheckConstraint("status IN ('active', 'depleted', 'expired')", name="status_known"),
        CheckConstraint("amount >= 0", name="amount_not_negative"),
        CheckConstraint("remaining >= 0", name="remaining_not_negative"),
        CheckConstraint("held >= 0 AND held <= remaining", name="held_within_remaining"),
        CheckConstraint("priority >= 0 AND priority <= 100", name="priority_range"),
        # A grant's own arithmetic; an active grant has tokens left, a depleted one none. (An
        # expired grant keeps none either, but a refund puts tokens back into one and expires
        # them again within its statement, and a CHECK cannot wait for the end of it.)
        CheckConstraint(
            "spent >= 0 AND expired >= 0 AND returned >= 0", name="counters_not_negative"
        ),
        CheckConstraint("remaining = amount - spent - expired + returned", name="arithmetic"),
        CheckConstraint("status <> 'active' OR remaining > 0", name="active_has_tokens"),
        CheckConstraint("status <> 'depleted' OR remaining = 0", name="depleted_has_none"),
        # A user's active grants in burn order (movements, tokens.grants).
        Index(
            "ix_grants_user_active",
            "user_id",
            "priority",
            "expires_at",
            "created_at",
            "id",
            postgresql_where=text("status = 'active'"),
        ),
        # Due grants across all users (grants.expire).
        Index(
            "ix_grants_active_expiry",
            "expires_at",
            "user_id",
            postgresql_where=text("status = 'active' AND expires_at IS NOT NULL"),
        ),
        Index("ix_grants_user_created", "user_id", "created_at"),
    )


class EntryGrant(Base):
    """How one ledger entry split across grants: the signed change to each grant's remaining.

    ``tokens_amount`` of the entry = sum of its splits - the change in the user's debt.
    """

    __tablename__ = "entry_grants"

    entry_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    grant_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("grants.id"), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)
    # The order the entry touched its grants in: a refund puts back the last spent first.
    seq: Mapped[int] = mapped_column(Integer)
    # The entry's: the split lives in the entry's month (partitioned alike).
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)

    __table_args__ = (
        ForeignKeyConstraint(
            ["entry_id", "created_at"],
            ["ledger_entries.id", "ledger_entries.created_at"],
            ondelete="CASCADE",
            onupdate="CASCADE",
        ),
        # The page reads an entry's splits from the key alone (migration 0038).
        PrimaryKeyConstraint(
            "entry_id",
            "grant_id",
            "created_at",
            name="pk_entry_grants",
            postgresql_include=["amount", "seq"],
        ),
        Index("ix_entry_grants_grant", "grant_id"),
        {"postgresql_partition_by": "RANGE (created_at)"},
    )


class ReservationGrant(Base):
    """What one reservation holds of one grant (chosen in burn order when it was made)."""

    __tablename__ = "reservation_grants"

    reservation_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("reservations.id", ondelete="CASCADE"), primary_key=True
    )
    grant_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("grants.id"), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (CheckConstraint("amount > 0", name="amount_positive"),)


class Event(Base):
    """The outbox: one row per event, written in the transaction of the change it reports
    (``sql/events/``). ``pos``: its place in the global order, given after it committed
    (``tokens_events_number``); the webhook columns: that channel's delivery of it.

    Partitioned by month of ``at``, the ledger's months (migration 0040), so ``events.prune``
    drops whole months; its key holds ``at``. ``id`` (one sequence), a user's ``seq`` (its
    account row's counter, tokens_event) and ``pos`` (one numbering at a time) are unique by
    how they are given; an index across partitions could not hold it without ``at``."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    # An account's events go with it: its seq counter does (a new account starts at 1 again).
    user_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("accounts.user_id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(BigInteger)
    type: Mapped[str] = mapped_column(String(64))
    at: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    data: Mapped[dict[str, Any]] = mapped_column(JSONType)
    # balance.changed: the entry (its split is read with the event).
    entry_id: Mapped[int | None] = mapped_column(BigInteger)
    pos: Mapped[int | None] = mapped_column(BigInteger)
    webhook_done_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    webhook_dead_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    webhook_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    webhook_next_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    webhook_failing_since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    webhook_error: Mapped[str | None] = mapped_column(String(1000))

    __table_args__ = (
        Index("ix_events_user_id_seq", "user_id", "seq"),
        Index("ix_events_pos", "pos", postgresql_where=text("pos IS NOT NULL")),
        # What the numbering reads: few rows, each for the moment between commit and number.
        Index("ix_events_unnumbered", "id", postgresql_where=text("pos IS NULL")),
        Index(
            "ix_events_webhook_pending",
            "pos",
            postgresql_where=text(
                "pos IS NOT NULL AND webhook_done_at IS NULL AND webhook_dead_at IS NULL"
            ),
        ),
        {"postgresql_partition_by": "RANGE (at)"},
    )


class EventPosition(Base):
    """One row: the last pos given; locked by the transaction numbering events."""

    __tablename__ = "event_positions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    last: Mapped[int] = mapped_column(BigInteger)


class EventChannel(Base):
    """A push channel delivering in pos order (the Celery task): every event up to ``pos`` sent."""

    __tablename__ = "event_channels"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    pos: Mapped[int] = mapped_column(BigInteger)


class EventAlerts(Base):
    """An account's thresholds and auto top-up, and what the last decision saw."""

    __tablename__ = "event_alerts"

    user_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("accounts.user_id", ondelete="CASCADE"), primary_key=True
    )
    thresholds: Mapped[list[int]] = mapped_column(
        ARRAY(BigInteger), default=list, server_default="{}"
    )
    # tokens_available at the last commit that changed it (crossings are counted from it).
    available: Mapped[int] = mapped_column(BigInteger)
    topup_below: Mapped[int | None] = mapped_column(BigInteger)
    topup_amount: Mapped[int | None] = mapped_column(BigInteger)
    topup_max_per_month: Mapped[int | None] = mapped_column(Integer)
    topup_key: Mapped[str | None] = mapped_column(String(64))
    topup_requested_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    topup_month: Mapped[datetime | None] = mapped_column(UTCDateTime)
    topup_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class SpendLimit(Base):
    """A spend limit (contract v1.2) on an account: what it and every account below it may spend
    in one window of ``period`` (calendar, UTC, or rolling)."""

    __tablename__ = "spend_limits"

    user_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("accounts.user_id"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    max_tokens: Mapped[int] = mapped_column(BigInteger)
    period: Mapped[str] = mapped_column(String(8))
    rolling: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The window (its first bucket) limit.reached was last written for: once per window.
    reached_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (
        CheckConstraint("max_tokens >= 0", name="max_not_negative"),
        CheckConstraint(
            "period IN ('minute', 'hour', 'day', 'week', 'month')", name="period_known"
        ),
    )


class LimitBucket(Base):
    """What an account with limits and the accounts below it spent (less refunds of those
    spends) within one bucket of time: ``grain`` names the bucket's width (``60s``, ``week``,
    ``month``; sql/limits/tokens_bucket.sql). A window's spend is the sum of its buckets, so no
    movement reads the ledger; old buckets are pruned as new ones are made."""

    __tablename__ = "limit_buckets"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    grain: Mapped[str] = mapped_column(String(8), primary_key=True)
    bucket: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    tokens: Mapped[int] = mapped_column(BigInteger)


class AccountHistory(Base):
    """What an account's tokens_reserved and tokens_spent became at each change (the trigger
    sql/history/tokens_history.sql writes it), for balances as of an instant."""

    __tablename__ = "account_history"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    user_id: Mapped[str] = mapped_column(
        String(128), ForeignKey("accounts.user_id", ondelete="CASCADE")
    )
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    reserved: Mapped[int] = mapped_column(BigInteger)
    spent: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (Index("ix_account_history_user_at", "user_id", "at", "id"),)


# The Core tables, typed, for statements built once with bind parameters.
account_table = cast(Table, Account.__table__)
ledger_table = cast(Table, LedgerEntry.__table__)
idempotency_table = cast(Table, IdempotencyRecord.__table__)
reservation_table = cast(Table, Reservation.__table__)
refund_total_table = cast(Table, RefundTotal.__table__)
sweep_table = cast(Table, Sweep.__table__)
sweep_chunk_table = cast(Table, SweepChunk.__table__)
grant_table = cast(Table, Grant.__table__)
entry_grant_table = cast(Table, EntryGrant.__table__)
reservation_grant_table = cast(Table, ReservationGrant.__table__)
spend_limit_table = cast(Table, SpendLimit.__table__)
limit_bucket_table = cast(Table, LimitBucket.__table__)
event_table = cast(Table, Event.__table__)
event_alerts_table = cast(Table, EventAlerts.__table__)
