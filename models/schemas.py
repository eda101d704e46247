"""Pydantic models for every task's kwargs and result.

The contract's models are defined once, in the producer client (``token_worker_client.models``,
a distribution of its own under ``client/``), and re-exported here: the worker validates with
the very classes producers use. Only the sweep's internal fan-out messages are the worker's own.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field

from token_worker_client.errors import ErrorCode
from token_worker_client.models import (
    EARLIEST_DATE,
    END_OF_DATES,
    MAX_AMOUNT,
    MAX_BATCH,
    MAX_METADATA_BYTES,
    MAX_TTL_SECONDS,
    Amount,
    BalanceIn,
    BalanceOut,
    Broken,
    CanAffordIn,
    CanAffordOut,
    CaptureIn,
    CaptureOut,
    ChargeIn,
    CreditIn,
    DebitBatchIn,
    DebitBatchOut,
    DebitIn,
    DeletedOut,
    DeleteOldEntriesIn,
    DueIn,
    DueOut,
    EligibilityOut,
    EntriesByTypeIn,
    EntriesOut,
    EntryId,
    EntryOut,
    EntrySplit,
    ExpireOut,
    ExtendIn,
    ExtendOut,
    Failure,
    GrantOut,
    GrantsExpireOut,
    GrantsIn,
    GrantsOut,
    IdempotencyKey,
    Limit,
    LimitsOut,
    Metadata,
    Mismatch,
    MovementOut,
    NextExpiry,
    NoArgsIn,
    NoNul,
    Offset,
    OpenAccountIn,
    OpenAccountOut,
    OperationType,
    Payload,
    PingOut,
    Priority,
    Reason,
    ReconcileIn,
    ReconcileOut,
    RefundIn,
    ReleaseIn,
    ReleaseOut,
    RenewOut,
    ReservationId,
    ReserveIn,
    ReserveOut,
    ResetBalanceIn,
    Result,
    SetLimitIn,
    SetTierIn,
    SpendLimitOut,
    StatisticsOut,
    SweepError,
    SweepIn,
    SweepOut,
    TierName,
    TotalOut,
    TypeStats,
    UserEntriesIn,
    UserId,
    UserIn,
    UserPeriodIn,
    UTCDatetime,
    VerifyIn,
    VerifyOut,
    metadata_bytes,
)

__all__ = [
    "EARLIEST_DATE",
    "END_OF_DATES",
    "MAX_AMOUNT",
    "MAX_BATCH",
    "MAX_METADATA_BYTES",
    "MAX_TTL_SECONDS",
    "Amount",
    "BalanceIn",
    "BalanceOut",
    "Broken",
    "CanAffordIn",
    "CanAffordOut",
    "CaptureIn",
    "CaptureOut",
    "ChargeIn",
    "CreditIn",
    "DebitBatchIn",
    "DebitBatchOut",
    "DebitIn",
    "DeleteOldEntriesIn",
    "DeletedOut",
    "DueIn",
    "DueOut",
    "EligibilityOut",
    "EntriesByTypeIn",
    "EntriesOut",
    "EntryId",
    "EntryOut",
    "EntrySplit",
    "ErrorCode",
    "ExpireOut",
    "ExtendIn",
    "ExtendOut",
    "Failure",
    "GrantOut",
    "GrantsExpireOut",
    "GrantsIn",
    "GrantsOut",
    "IdempotencyKey",
    "Limit",
    "LimitsOut",
    "Metadata",
    "Mismatch",
    "MovementOut",
    "NextExpiry",
    "NoArgsIn",
    "NoNul",
    "Offset",
    "OpenAccountIn",
    "OpenAccountOut",
    "OperationType",
    "Payload",
    "PingOut",
    "Priority",
    "Reason",
    "ReconcileIn",
    "ReconcileOut",
    "RefundIn",
    "ReleaseIn",
    "ReleaseOut",
    "RenewOut",
    "ReservationId",
    "ReserveIn",
    "ReserveOut",
    "ResetBalanceIn",
    "Result",
    "SetLimitIn",
    "SetTierIn",
    "SpendLimitOut",
    "StatisticsOut",
    "SweepChunkIn",
    "SweepChunkOut",
    "SweepError",
    "SweepId",
    "SweepIn",
    "SweepOut",
    "SweepPlanned",
    "SweepTotalsIn",
    "TierName",
    "TotalOut",
    "TypeStats",
    "UTCDatetime",
    "UserEntriesIn",
    "UserId",
    "UserIn",
    "UserPeriodIn",
    "VerifyIn",
    "VerifyOut",
    "metadata_bytes",
]

# The sweep's fan-out (internal tasks: sent by renewals.sweep itself, not by producers).
SweepId = Annotated[str, Field(min_length=1, max_length=255), NoNul]


class SweepChunkIn(Payload):
    sweep_id: SweepId
    index: Annotated[int, Field(ge=0)]


class SweepTotalsIn(Payload):
    sweep_id: SweepId


class SweepPlanned(Result):
    """What the planning step of ``renewals.sweep`` hands to its fan-out (never a task result)."""

    sweep_id: str
    chunks: int


class SweepChunkOut(Result):
    """One chunk's tally (``renewals.sweep_chunk``); the sweep's result sums them."""

    sweep_id: str
    index: int
    status: str
    successful: int
    skipped: int
    failed: int


class Month(Result):
    """One of the ledger's partitions (``lower`` None: ``before``, everything before the first
    month; ``upper`` None: ``after``, everything past the newest month)."""

    name: str
    lower: datetime | None
    upper: datetime | None
    entries: int


class MonthsOut(Result):
    """``ledger.make_months``: the months made (``YYYY_MM``), none when they existed; the end
    of the newest month; the entries past it (in the partition ``after``)."""

    made: list[str]
    until: datetime
    outside: int
