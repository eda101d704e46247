"""Events (contract v1.2 "Events"): the tasks' kwargs and results, and :func:`verify_webhook`
for a webhook receiver."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator

from token_worker_client.models import (
    MAX_AMOUNT,
    Limit,
    Payload,
    Result,
    UserId,
    UTCDatetime,
)

#: The webhook's signature header.
SIGNATURE_HEADER = "Tokens-Signature"
#: How far a signature's ``t`` may be from now, by default (seconds; Stripe's default too).
TOLERANCE_SECONDS = 300
MAX_THRESHOLDS = 4

Cursor = Annotated[str, Field(pattern=r"^[0-9]{1,18}$")]
Threshold = Annotated[int, Field(ge=-MAX_AMOUNT, le=MAX_AMOUNT)]


class EventOut(BaseModel):
    event_id: str
    type: str
    user_id: str
    seq: int
    at: UTCDatetime
    data: dict[str, Any]


class EventsListIn(Payload):
    after: Cursor | None = None
    limit: Limit = 100
    user_id: UserId | None = None


class EventsOut(Result):
    events: list[EventOut]
    next: str


class SetAlertsIn(Payload):
    user_id: UserId
    thresholds: list[Threshold] = Field(max_length=MAX_THRESHOLDS)


class AutoTopup(BaseModel):
    below: int
    amount: int
    max_per_month: int | None


class AlertsOut(Result):
    user_id: str
    thresholds: list[int]
    auto_topup: AutoTopup | None


class SetAutoTopupIn(Payload):
    user_id: UserId
    below: Threshold | None
    amount: Annotated[int, Field(ge=1, le=MAX_AMOUNT)] | None = None
    max_per_month: Annotated[int, Field(ge=1, le=10_000)] | None = None

    @model_validator(mode="after")
    def _amount_with_below(self) -> SetAutoTopupIn:
        if self.below is not None and self.amount is None:
            raise ValueError("amount: required with below")
        return self


def signature_header(secret: str | bytes, body: bytes, at: int | None = None) -> str:
    """The ``Tokens-Signature`` value for ``body`` sent at ``at`` (UNIX seconds, default now)."""
    t = int(time.time()) if at is None else at
    key = secret.encode() if isinstance(secret, str) else secret
    mac = hmac.new(key, f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


_PART = re.compile(r"\s*([a-z0-9]+)=([^,]*)\s*")


def verify_webhook(
    body: bytes,
    header: str | None,
    secret: str | bytes,
    tolerance: int = TOLERANCE_SECONDS,
    now: float | None = None,
) -> bool:
    """Whether ``body`` (the request's bytes, exactly as received) carries a valid
    ``Tokens-Signature`` ``header`` under ``secret``, signed within ``tolerance`` seconds of now
    (a replayed old request fails). Compared in constant time; any ``v1`` of the header may match
    (one per secret while a secret is rotated)."""
    if not header:
        return False
    parts = [_PART.fullmatch(p) for p in header.split(",")]
    if not all(parts):
        return False
    stamps = [m.group(2) for m in parts if m and m.group(1) == "t"]
    macs = [m.group(2) for m in parts if m and m.group(1) == "v1"]
    if len(stamps) != 1 or not stamps[0].isdigit() or not macs:
        return False
    t = int(stamps[0])
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = signature_header(secret, body, t).partition(",v1=")[2]
    matched = False
    for mac in macs:
        matched |= hmac.compare_digest(expected.encode(), mac.encode())
    return matched
