"""The task contract as pydantic models: every task's kwargs (strict: nothing is coerced) and
result. The worker validates with these very classes, so a payload this module accepts is one the
worker accepts, and a refusal here carries the worker's own ``VALIDATION_ERROR`` text.

Kwargs are validated in JSON mode, which is what a producer actually sends: ``true``, ``1.5`` and
``"10"`` are not integers, while ISO 8601 strings are datetimes.
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, NoReturn, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from token_worker_client.errors import ErrorCode, InvalidPayload, TokenRefused

MAX_AMOUNT = 10**12
MAX_METADATA_BYTES = 8 * 1024
MAX_TTL_SECONDS = 7 * 24 * 3600
MAX_BATCH = 1000
EARLIEST_DATE = datetime(1970, 1, 1, tzinfo=UTC)
END_OF_DATES = datetime(3000, 1, 1, tzinfo=UTC)


def _check_user_id(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise ValueError("must not contain control characters")
    return value


def _check_no_nul(value: str) -> str:
    # PostgreSQL text and jsonb cannot hold U+0000: let it through and the INSERT fails the task.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _stored(number: float) -> str:
    """A float as PostgreSQL keeps it in jsonb: a numeric, written out in full (1e300 is a 1 and
    300 zeros, 1.5e-07 is 0.00000015; numeric has no negative zero)."""
    return format(Decimal(repr(abs(number) if number == 0 else number)), "f")


def metadata_bytes(value: dict[str, Any]) -> int:
    """The size that ``MAX_METADATA_BYTES`` bounds: compact JSON, UTF-8, as it is stored, each
    number written as PostgreSQL writes it back (a bound on what Python prints would let 8 KiB
    of ``1e300`` store as 240 KiB)."""
    size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, float):
            size += len(_stored(item)) - len(repr(item))
        elif isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return size


def _check_metadata(value: dict[str, Any]) -> dict[str, Any]:
    pending: list[Any] = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            _check_no_nul(item)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError("must not contain NaN or Infinity (JSON has no such numbers)")
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    size = metadata_bytes(value)
    if size > MAX_METADATA_BYTES:
        raise ValueError(f"is {size} bytes serialized; at most {MAX_METADATA_BYTES} allowed")
    return value


def _parse_iso8601(value: Any) -> Any:
    # Any ISO 8601 form and nothing else: pydantic's strict parser refuses a calendar date alone
    # ("2026-06-01") yet reads "1700000000" as a Unix time.
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _as_utc(value: datetime) -> datetime:
    # A date given without an offset is read as UTC.
    try:
        value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00: no such year in UTC
        raise ValueError("is out of range in UTC") from None
    # Far dates pass parsing, then overflow date arithmetic (a renewal 30 days after 9999-12-20).
    if not EARLIEST_DATE <= value < END_OF_DATES:
        raise ValueError("must be from 1970-01-01 up to (not including) 3000-01-01 UTC")
    return value


UserId = Annotated[str, Field(min_length=1, max_length=128), AfterValidator(_check_user_id)]
Amount = Annotated[int, Field(le=MAX_AMOUNT)]
Metadata = Annotated[dict[str, Any], AfterValidator(_check_metadata)]
NoNul = AfterValidator(_check_no_nul)
IdempotencyKey = Annotated[str, Field(min_length=1, max_length=255), NoNul]
OperationType = Annotated[str, Field(min_length=1, max_length=64), NoNul]
TierName = Annotated[str, Field(min_length=1, max_length=64), NoNul]
Reason = Annotated[str, Field(max_length=1000), NoNul]
UTCDatetime = Annotated[
    datetime,
    BeforeValidator(_parse_iso8601),
    AfterValidator(_as_utc),
    PlainSerializer(lambda d: d.isoformat(), return_type=str, when_used="json"),
]
Limit = Annotated[int, Field(ge=1, le=1000)]
Offset = Annotated[int, Field(ge=0, le=2**63 - 1)]  # SQL OFFSET is a BIGINT


class Payload(BaseModel):
    """Base of every task's kwargs."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


P = TypeVar("P", bound=Payload)


def describe(exc: ValidationError) -> str:
    """The ``VALIDATION_ERROR`` text: each bad field and why."""
    parts = []
    for err in exc.errors(include_url=False):
        field = ".".join(str(p) for p in err["loc"]) or "kwargs"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown argument"
        parts.append(f"{field}: {message}")
    return "Invalid arguments: " + "; ".join(parts)


def parse_payload(schema: type[P], kwargs: Mapping[str, Any]) -> P:
    """``kwargs`` as the worker reads them: through JSON, strictly. Raises :class:`InvalidPayload`
    with the ``VALIDATION_ERROR`` text."""
    try:
        raw = json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidPayload(f"Invalid arguments: not JSON ({exc})") from None
    try:
        return schema.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise InvalidPayload(describe(exc)) from None


# --- accounts -------------------------------------------------------------------------------


class OpenAccountIn(Payload):
    user_id: UserId
    tier: TierName = "Gift"
    initial_balance: Amount = 0
    subscription_expires_at: UTCDatetime | None = None
    last_renewal_at: UTCDatetime | None = None
    # v1.2: a member of the parent's pool (its initial_balance must be 0), at most 3 levels.
    parent_id: UserId | None = None


class SetTierIn(Payload):
    user_id: UserId
    tier: TierName
    subscription_expires_at: UTCDatetime | None = None


class UserIn(Payload):
    user_id: UserId


class BalanceIn(Payload):
    user_id: UserId
    # v1.2: the balance fields as they were at this instant
    as_of: UTCDatetime | None = None


class CanAffordIn(Payload):
    user_id: UserId
    operation_type: OperationType


# --- spend limits (v1.2) --------------------------------------------------------------------

MAX_LIMITS = 8
Period = Literal["minute", "hour", "day", "week", "month"]
LimitName = Annotated[str, Field(min_length=1, max_length=64), NoNul]


class SetLimitIn(Payload):
    user_id: UserId
    name: LimitName
    # None removes the limit ``name`` (``period`` is then not needed).
    max_tokens: Annotated[int, Field(ge=0, le=MAX_AMOUNT)] | None = None
    period: Period | None = None
    rolling: bool = False


# --- movements ------------------------------------------------------------------------------


class DebitIn(Payload):
    user_id: UserId
    amount: Amount
    operation_type: OperationType
    allow_overdraft: bool = False
    metadata: Metadata = Field(default_factory=dict)
    idempotency_key: IdempotencyKey | None = None


class DebitBatchIn(Payload):
    # A malformed item refuses the whole batch, named by its position (debits.3.amount).
    debits: Annotated[list[DebitIn], Field(min_length=1, max_length=MAX_BATCH)]


Priority = Annotated[int, Field(ge=0, le=100)]


class CreditIn(Payload):
    user_id: UserId
    amount: Amount
    operation_type: OperationType = "purchase"
    metadata: Metadata = Field(default_factory=dict)
    idempotency_key: IdempotencyKey | None = None
    # v1.1: the grant the tokens become. ``expires_at`` must be in the future (checked by the
    # worker against the database's clock); ``priority`` defaults by kind (purchased 50, promo 20).
    grant_kind: Literal["purchased", "promo"] = "purchased"
    expires_at: UTCDatetime | None = None
    priority: Priority | None = None


class ChargeIn(Payload):
    user_id: UserId
    operation_type: OperationType
    metadata: Metadata = Field(default_factory=dict)
    idempotency_key: IdempotencyKey | None = None


def _int_id_as_text(value: Any) -> Any:
    # Entry ids come back as strings; the integer a producer may hold is accepted as well
    # (but not a bool, which JSON keeps apart from numbers).
    if type(value) is int:
        if value < 1:
            raise ValueError("must be a positive entry id")
        return str(value)
    return value


EntryId = Annotated[str, BeforeValidator(_int_id_as_text), Field(min_length=1, max_length=32)]


class RefundIn(Payload):
    user_id: UserId
    amount: Amount
    reason: Reason | None = None
    original_entry_id: EntryId | None = None
    metadata: Metadata = Field(default_factory=dict)
    idempotency_key: IdempotencyKey | None = None


class ResetBalanceIn(Payload):
    user_id: UserId
    new_balance: Amount
    reason: Reason | None = None
    metadata: Metadata = Field(default_factory=dict)


# --- reservations ---------------------------------------------------------------------------


class ReserveIn(Payload):
    user_id: UserId
    amount: Amount | None = None
    operation_type: OperationType | None = None
    ttl_seconds: Annotated[int, Field(ge=1, le=MAX_TTL_SECONDS)] = 900
    metadata: Metadata = Field(default_factory=dict)
    idempotency_key: IdempotencyKey | None = None
    # v1.1: a capture may take up to amount + overcapture_limit.
    overcapture_limit: Annotated[int, Field(ge=0, le=MAX_AMOUNT)] = 0


ReservationId = Annotated[str, Field(min_length=1, max_length=64), NoNul]


class CaptureIn(Payload):
    reservation_id: ReservationId
    amount: Amount | None = None
    metadata: Metadata = Field(default_factory=dict)


class ReleaseIn(Payload):
    reservation_id: ReservationId
    reason: Reason | None = None


class ExtendIn(Payload):
    reservation_id: ReservationId
    amount: Annotated[int, Field(ge=0, le=MAX_AMOUNT)] = 0
    ttl_seconds: Annotated[int, Field(ge=1, le=MAX_TTL_SECONDS)] | None = None


class GrantsIn(Payload):
    user_id: UserId
    include_ended: bool = False


class NoArgsIn(Payload):
    pass


# --- ledger ---------------------------------------------------------------------------------


class UserEntriesIn(Payload):
    user_id: UserId
    operation_type: OperationType | None = None
    start_date: UTCDatetime | None = None
    end_date: UTCDatetime | None = None
    limit: Limit = 50
    offset: Offset = 0


class EntriesByTypeIn(Payload):
    operation_type: OperationType
    start_date: UTCDatetime | None = None
    end_date: UTCDatetime | None = None
    limit: Limit = 50
    offset: Offset = 0


class UserPeriodIn(Payload):
    user_id: UserId
    start_date: UTCDatetime | None = None
    end_date: UTCDatetime | None = None


class DeleteOldEntriesIn(Payload):
    older_than: UTCDatetime


class ReconcileIn(Payload):
    user_id: UserId | None = None


class VerifyIn(Payload):
    user_id: UserId | None = None


# --- renewals -------------------------------------------------------------------------------


class SweepIn(Payload):
    tier: TierName | None = None
    limit: Annotated[int, Field(ge=1)] | None = None
    dry_run: bool = False
    continue_on_error: bool = True


class DueIn(Payload):
    tier: TierName | None = None
    limit: Annotated[int, Field(ge=1, le=100_000)] | None = None


# === results ================================================================================


class Result(BaseModel):
    """Base of every successful result."""

    model_config = ConfigDict(extra="forbid")

    success: Literal[True] = True

    def unwrap(self) -> Self:
        """This result (a refusal's ``unwrap`` raises instead)."""
        return self


# A code this client does not know yet (a newer worker's) stays a plain string; a dump always
# gives a plain string.
Code = Annotated[
    ErrorCode | str,
    Field(union_mode="left_to_right"),
    PlainSerializer(str, return_type=str),
]


class SpendLimitOut(BaseModel):
    """A spend limit as ``tokens.limits`` lists it: ``used`` in the current window (holds
    included), ``remaining``, and ``resets_at`` (a calendar window's end; for a rolling window,
    when the oldest spend still counted leaves it, or None when no spend counts)."""

    user_id: str
    name: str
    max_tokens: int
    period: str
    rolling: bool
    used: int
    remaining: int
    resets_at: UTCDatetime | None


def _absent(value: Any) -> bool:
    return value is None


class Failure(BaseModel):
    """A refusal: nothing changed."""

    model_config = ConfigDict(extra="forbid")

    success: Literal[False] = False
    error: str
    error_code: Code
    # LIMIT_EXCEEDED: the limit that refused (absent from every other refusal).
    limit: SpendLimitOut | None = Field(default=None, exclude_if=_absent)

    def unwrap(self) -> NoReturn:
        """Raise the :class:`~token_worker_client.errors.TokenRefused` subclass of this code."""
        raise TokenRefused.of(self)


class NextExpiry(BaseModel):
    at: UTCDatetime
    tokens: int


class BalanceOut(Result):
    user_id: str
    tokens_balance: int
    tokens_reserved: int
    tokens_available: int
    tokens_spent: int
    tier: str
    last_renewal_at: UTCDatetime | None
    subscription_expires_at: UTCDatetime | None
    # v1.1 (defaults let this client read a v1 worker's results)
    by_kind: dict[str, int] = Field(default_factory=dict)
    debt: int = 0
    next_expiry: NextExpiry | None = None
    # v1.2: a member's pool and parent (both None for a pool, which every other account is)
    pool_id: str | None = None
    parent_id: str | None = None
    # v1.2: the instant asked for, when the fields are as they were then (absent otherwise)
    as_of: UTCDatetime | None = None

    @model_serializer(mode="wrap")
    def _as_of_only_when_asked(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if data.get("as_of") is None:
            data.pop("as_of", None)
        return data


class OpenAccountOut(BalanceOut):
    created: bool


class CanAffordOut(Result):
    can_afford: bool
    cost: int
    balance: int
    deficit: int
    # v1.2: the limit that would refuse (only then present)
    limit: SpendLimitOut | None = Field(default=None, exclude_if=_absent)


class MovementOut(Result):
    user_id: str
    operation_type: str
    amount: int
    balance_before: int
    new_balance: int
    tokens_spent: int
    ledger_entry_id: str
    replayed: bool = False


class CaptureOut(MovementOut):
    """``tokens.capture``: a movement, and how far it went past the hold (v1.1)."""

    overcaptured: int = 0
    shortfall: int = 0


class DebitBatchOut(Result):
    """One result per item, in the order sent: what ``tokens.debit`` returns for it."""

    results: list[MovementOut | Failure]
    applied: int
    refused: int


class ReserveOut(Result):
    reservation_id: str
    amount: int
    expires_at: UTCDatetime
    tokens_available: int
    replayed: bool = False


class ReleaseOut(Result):
    reservation_id: str
    status: str


class ExtendOut(Result):
    reservation_id: str
    amount: int
    expires_at: UTCDatetime
    tokens_available: int


class ExpireOut(Result):
    expired: int


class GrantsExpireOut(Result):
    expired: int
    tokens_expired: int


class GrantOut(BaseModel):
    grant_id: str
    kind: str
    amount: int
    remaining: int
    # What active reservations hold of ``remaining`` (beyond the contract's fields).
    held: int = 0
    priority: int
    expires_at: UTCDatetime | None
    created_at: UTCDatetime
    status: str


class GrantsOut(Result):
    user_id: str
    grants: list[GrantOut]
    debt: int


class EntrySplit(BaseModel):
    grant_id: str
    amount: int


class EntryOut(BaseModel):
    id: str
    user_id: str
    operation_type: str
    tokens_amount: int
    balance_before: int
    balance_after: int
    idempotency_key: str | None
    original_entry_id: str | None
    metadata: dict[str, Any]
    created_at: UTCDatetime
    grants: list[EntrySplit] = Field(default_factory=list)
    # v1.2: the member that spent it, in its pool's ledger (None: the account's own)
    spent_by: str | None = None
    # v1.2: the user's hash chain (None from a worker before it).
    prev_hash: str | None = None
    hash: str | None = None


class EntriesOut(Result):
    entries: list[EntryOut]


class TotalOut(Result):
    total: int


class TypeStats(BaseModel):
    count: int
    total: int


class StatisticsOut(Result):
    total_spent: int
    total_earned: int
    net_change: int
    operation_count: int
    by_type: dict[str, TypeStats]


class DeletedOut(Result):
    deleted: int


class Mismatch(BaseModel):
    user_id: str
    balance: int
    ledger_sum: int
    # v1.1: what the grants say (active remaining - debt), and each grant whose own arithmetic
    # (remaining = amount - spent - expired + returned, 0 <= held <= remaining) fails.
    grants_balance: int | None = None
    bad_grants: list[str] = Field(default_factory=list)


class ReconcileOut(Result):
    checked: int
    mismatches: list[Mismatch]


class Broken(BaseModel):
    user_id: str
    entry_id: str | None
    reason: str


class VerifyOut(Result):
    checked: int
    broken: list[Broken]


class EligibilityOut(Result):
    user_id: str
    eligible: bool
    reason: str
    next_renewal_date: UTCDatetime | None
    days_until_renewal: int


class RenewOut(Result):
    user_id: str
    tier: str
    tokens_added: int
    previous_balance: int
    new_balance: int
    renewal_date: UTCDatetime
    # v1.1 (the reset policy; 0 under add)
    tokens_expired: int = 0
    tokens_rolled_over: int = 0


class SweepError(BaseModel):
    user_id: str
    error: str


class SweepOut(Result):
    total_processed: int
    successful: int
    failed: int
    skipped: int
    errors: list[SweepError]


class LimitsOut(Result):
    """``tokens.limits`` (every limit that applies: the account's, then each account's above
    it, up to the pool, each by name) and ``tokens.set_limit`` (the account's own)."""

    user_id: str
    limits: list[SpendLimitOut]


class PingOut(Result):
    """``health.ping``: broker, worker, database and backend all answered."""

    at: UTCDatetime


class DueOut(Result):
    user_ids: list[str]
