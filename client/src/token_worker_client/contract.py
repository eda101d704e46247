"""Each contract task as this client calls it: its name, its kwargs model, its result type, and
what makes a repeat of it safe.

A message delivered twice never applies twice (the worker's guarantee). A call the client sends
again because no result came in time is such a repeat only if it carries the same key: the
contract's ``idempotency_key`` for the tasks that take one, else the task id, which is the key
of ``reset_balance``, ``capture``, ``release``, ``extend``, ``renew_user``, ``sweep`` (its plan) and
``debit_batch`` (its items' default keys).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from enum import Enum
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BaseModel, Field, TypeAdapter

from token_worker_client.errors import ErrorCode, InvalidPayload
from token_worker_client.events import (
    AlertsOut,
    EventsListIn,
    EventsOut,
    SetAlertsIn,
    SetAutoTopupIn,
)
from token_worker_client.models import (
    BalanceIn,
    BalanceOut,
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
    ExpireOut,
    ExtendIn,
    ExtendOut,
    Failure,
    GrantsExpireOut,
    GrantsIn,
    GrantsOut,
    LimitsOut,
    MovementOut,
    NoArgsIn,
    OpenAccountIn,
    OpenAccountOut,
    Payload,
    PingOut,
    ReconcileIn,
    ReconcileOut,
    RefundIn,
    ReleaseIn,
    ReleaseOut,
    RenewOut,
    ReserveIn,
    ReserveOut,
    ResetBalanceIn,
    SetLimitIn,
    SetTierIn,
    StatisticsOut,
    SweepIn,
    SweepOut,
    TotalOut,
    UserEntriesIn,
    UserIn,
    UserPeriodIn,
    VerifyIn,
    VerifyOut,
    parse_payload,
)

R = TypeVar("R")


class Key(Enum):
    """What makes a repeat of the task safe."""

    NONE = "none"  # a read, or a write that is the same however often it runs
    KWARG = "idempotency_key"  # the contract's idempotency_key (per user)
    TASK_ID = "task_id"  # the Celery task id is the key


@dataclass(frozen=True)
class Spec(Generic[R]):
    name: str
    payload: type[Payload]
    result: TypeAdapter[R]
    key: Key = Key.NONE

    def parse(self, value: Any) -> R:
        # A newer worker may add result fields (the contract allows it): kept, in model_extra.
        return self.result.validate_python(value, extra="allow")


def _spec(
    name: str, payload: type[Payload], result: type[BaseModel], key: Key = Key.NONE
) -> Spec[Any]:
    # Built at run time, so a type to pydantic but not to mypy (the constants below say R).
    outcome: Any = Annotated[result | Failure, Field(discriminator="success")]
    return Spec(name, payload, TypeAdapter(outcome), key)


# Each typed by what it returns; the method of the same name (client.py, aio.py) sends it.
OPEN_ACCOUNT: Spec[OpenAccountOut | Failure] = _spec(
    "tokens.open_account", OpenAccountIn, OpenAccountOut
)
SET_TIER: Spec[BalanceOut | Failure] = _spec("tokens.set_tier", SetTierIn, BalanceOut)
GET_BALANCE: Spec[BalanceOut | Failure] = _spec("tokens.get_balance", BalanceIn, BalanceOut)
CAN_AFFORD: Spec[CanAffordOut | Failure] = _spec("tokens.can_afford", CanAffordIn, CanAffordOut)
DEBIT: Spec[MovementOut | Failure] = _spec("tokens.debit", DebitIn, MovementOut, Key.KWARG)
DEBIT_BATCH: Spec[DebitBatchOut | Failure] = _spec(
    "tokens.debit_batch", DebitBatchIn, DebitBatchOut, Key.TASK_ID
)
CREDIT: Spec[MovementOut | Failure] = _spec("tokens.credit", CreditIn, MovementOut, Key.KWARG)
CHARGE: Spec[MovementOut | Failure] = _spec("tokens.charge", ChargeIn, MovementOut, Key.KWARG)
REFUND: Spec[MovementOut | Failure] = _spec("tokens.refund", RefundIn, MovementOut, Key.KWARG)
RESET_BALANCE: Spec[MovementOut | Failure] = _spec(
    "tokens.reset_balance", ResetBalanceIn, MovementOut, Key.TASK_ID
)
RESERVE: Spec[ReserveOut | Failure] = _spec("tokens.reserve", ReserveIn, ReserveOut, Key.KWARG)
CAPTURE: Spec[CaptureOut | Failure] = _spec("tokens.capture", CaptureIn, CaptureOut, Key.TASK_ID)
RELEASE: Spec[ReleaseOut | Failure] = _spec("tokens.release", ReleaseIn, ReleaseOut, Key.TASK_ID)
EXPIRE_RESERVATIONS: Spec[ExpireOut | Failure] = _spec("reservations.expire", NoArgsIn, ExpireOut)
EXTEND: Spec[ExtendOut | Failure] = _spec("tokens.extend", ExtendIn, ExtendOut, Key.TASK_ID)
GRANTS: Spec[GrantsOut | Failure] = _spec("tokens.grants", GrantsIn, GrantsOut)
# Setting a limit to what it is changes nothing: a repeat is safe without a key.
SET_LIMIT: Spec[LimitsOut | Failure] = _spec("tokens.set_limit", SetLimitIn, LimitsOut)
LIMITS: Spec[LimitsOut | Failure] = _spec("tokens.limits", UserIn, LimitsOut)
EXPIRE_GRANTS: Spec[GrantsExpireOut | Failure] = _spec("grants.expire", NoArgsIn, GrantsExpireOut)
SET_ALERTS: Spec[AlertsOut | Failure] = _spec("tokens.set_alerts", SetAlertsIn, AlertsOut)
SET_AUTO_TOPUP: Spec[AlertsOut | Failure] = _spec(
    "tokens.set_auto_topup", SetAutoTopupIn, AlertsOut
)
LIST_EVENTS: Spec[EventsOut | Failure] = _spec("events.list", EventsListIn, EventsOut)
USER_ENTRIES: Spec[EntriesOut | Failure] = _spec("ledger.user_entries", UserEntriesIn, EntriesOut)
ENTRIES_BY_TYPE: Spec[EntriesOut | Failure] = _spec(
    "ledger.entries_by_type", EntriesByTypeIn, EntriesOut
)
TOTAL_SPENT: Spec[TotalOut | Failure] = _spec("ledger.total_spent", UserPeriodIn, TotalOut)
TOTAL_EARNED: Spec[TotalOut | Failure] = _spec("ledger.total_earned", UserPeriodIn, TotalOut)
STATISTICS: Spec[StatisticsOut | Failure] = _spec("ledger.statistics", UserPeriodIn, StatisticsOut)
DELETE_OLD_ENTRIES: Spec[DeletedOut | Failure] = _spec(
    "ledger.delete_old_entries", DeleteOldEntriesIn, DeletedOut
)
RECONCILE: Spec[ReconcileOut | Failure] = _spec("ledger.reconcile", ReconcileIn, ReconcileOut)
VERIFY: Spec[VerifyOut | Failure] = _spec("ledger.verify", VerifyIn, VerifyOut)
CHECK_ELIGIBILITY: Spec[EligibilityOut | Failure] = _spec(
    "renewals.check_eligibility", UserIn, EligibilityOut
)
RENEW_USER: Spec[RenewOut | Failure] = _spec("renewals.renew_user", UserIn, RenewOut, Key.TASK_ID)
SWEEP: Spec[SweepOut | Failure] = _spec("renewals.sweep", SweepIn, SweepOut, Key.TASK_ID)
DUE: Spec[DueOut | Failure] = _spec("renewals.due", DueIn, DueOut)
PING: Spec[PingOut | Failure] = _spec("health.ping", NoArgsIn, PingOut)

# The methods' own options, never sent as kwargs.
OPTIONS = ("self", "timeout", "task_id")


@dataclass(frozen=True)
class Request:
    """One call, ready to send as often as it takes: the same task id and kwargs every time."""

    task: str
    kwargs: dict[str, Any]
    task_id: str
    idempotency_key: str | None
    key: Key

    @property
    def retry_with(self) -> str:
        """How the caller repeats this call safely later."""
        if self.key is Key.KWARG:
            return f"Retry with idempotency_key={self.idempotency_key!r}."
        if self.key is Key.TASK_ID:
            return f"Retry with task_id={self.task_id!r}."
        return "Retrying is safe."


def _jsonable(value: Any) -> Any:
    if isinstance(value, date):  # datetime too: ISO 8601, as the contract reads dates
        return value.isoformat()
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_unset=True)
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def prepare(spec: Spec[Any], arguments: Mapping[str, Any]) -> Request | Failure:
    """The request for a method's ``arguments`` (its ``locals()``), or the ``VALIDATION_ERROR``
    the worker would answer, without sending anything.

    An argument left at ``None`` whose contract default is something else (``metadata``) is not
    sent, so the worker applies the default."""
    fields = spec.payload.model_fields
    kwargs = {
        name: _jsonable(value)
        for name, value in arguments.items()
        if name not in OPTIONS and (value is not None or fields[name].default is None)
    }
    task_id = arguments.get("task_id") or str(uuid.uuid4())
    if spec.key is Key.KWARG and kwargs.get("idempotency_key") is None:
        kwargs["idempotency_key"] = str(uuid.uuid4())
    try:
        parse_payload(spec.payload, kwargs)
    except InvalidPayload as exc:
        return Failure(error=str(exc), error_code=ErrorCode.VALIDATION_ERROR)
    return Request(
        task=spec.name,
        # exactly what was validated: the worker reads the same JSON
        kwargs=json.loads(json.dumps(kwargs)),
        task_id=task_id,
        idempotency_key=kwargs.get("idempotency_key"),
        key=spec.key,
    )
