"""``TokenClient``: one typed, blocking method per contract task."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from datetime import date
from types import TracebackType
from typing import Any, TypeVar

from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from kombu.exceptions import OperationalError

from token_worker_client import contract
from token_worker_client.contract import Request, Spec, prepare
from token_worker_client.errors import TaskFailed, TokenTimeout, TokenUnavailable
from token_worker_client.events import AlertsOut, EventsOut
from token_worker_client.models import (
    BalanceOut,
    CanAffordOut,
    CaptureOut,
    DebitBatchOut,
    DebitIn,
    DeletedOut,
    DueOut,
    EligibilityOut,
    EntriesOut,
    ExpireOut,
    ExtendOut,
    Failure,
    GrantsExpireOut,
    GrantsOut,
    LimitsOut,
    MovementOut,
    OpenAccountOut,
    PingOut,
    ReconcileOut,
    ReleaseOut,
    RenewOut,
    ReserveOut,
    StatisticsOut,
    SweepOut,
    TotalOut,
    VerifyOut,
)
from token_worker_client.signing import Signer, sign_messages

R = TypeVar("R")
Date = date | str  # a date, a datetime or an ISO 8601 string

#: The embedded default's loopback ports (the worker's ``make run``), as the worker's settings
#: read them: TOKENS_EMBEDDED_VALKEY_PORT and TOKENS_EMBEDDED_PG_PORT.
EMBEDDED_VALKEY_PORT = 63790
EMBEDDED_PG_PORT = 54329
#: The longest wait between two reads of a result backend that must be polled (a database);
#: Celery's default, 0.5 s, made every call on the SQLAlchemy fallback take half a second.
RESULT_POLL_INTERVAL = 0.005


def _port(variable: str, default: int) -> int:
    value = os.environ.get(variable, "")
    return int(value) if value.isdigit() else default


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def default_urls() -> tuple[str, str]:
    """The broker and result backend of a client given none: ``TOKENS_BROKER_URL`` and
    ``TOKENS_RESULT_BACKEND`` when both are set; else the worker's embedded default (``make
    run``): its Valkey, or where no Valkey listens but its PostgreSQL does, the SQLAlchemy
    transport and database backend on that PostgreSQL (which needs SQLAlchemy and psycopg)."""
    broker, backend = os.environ.get("TOKENS_BROKER_URL"), os.environ.get("TOKENS_RESULT_BACKEND")
    if broker and backend:
        return broker, backend
    valkey = _port("TOKENS_EMBEDDED_VALKEY_PORT", EMBEDDED_VALKEY_PORT)
    postgres = _port("TOKENS_EMBEDDED_PG_PORT", EMBEDDED_PG_PORT)
    if not _listening(valkey) and _listening(postgres):
        url = f"postgresql+psycopg://postgres@127.0.0.1:{postgres}/celery"
        return f"sqla+{url}", f"db+{url}"
    return f"redis://127.0.0.1:{valkey}/0", f"redis://127.0.0.1:{valkey}/1"


def producer_signer(name: str | None, key: str | None) -> Signer | None:
    """The signer a client was given, else the environment's; None: messages go unsigned."""
    signer = Signer.of(name, key)
    return signer if signer is not None else Signer.from_env()


# Up to 3 more sends of a publish that failed on the connection, 0.2 s apart then 0.4, 0.6.
PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.2, "interval_max": 1}


def publisher_confirms(broker_url: str) -> dict[str, Any]:
    """On RabbitMQ, publish with confirms: ``send_task`` returns once the broker has taken the
    message (on a quorum queue, a majority of its nodes), and a refusal raises instead of
    returning as if sent. Redis answers each publish itself (its reply is the LPUSH's)."""
    if broker_url.split(":", 1)[0] in ("amqp", "amqps", "pyamqp"):
        return {"broker_transport_options": {"confirm_publish": True}}
    return {}


class Transport:
    """The Celery side, shared by both clients: send one request and wait for its result.

    Celery keeps one result backend per thread (``result_backend_thread_safe`` is off), and the
    Redis backend subscribes to a task's result when the message is sent: so a request is sent
    and awaited in the same thread, and each thread has its own backend connection.
    """

    def __init__(
        self,
        broker_url: str | None = None,
        backend_url: str | None = None,
        config: Mapping[str, Any] | None = None,
        signer: Signer | None = None,
    ) -> None:
        if broker_url is None or backend_url is None:
            default_broker, default_backend = default_urls()
            broker_url = broker_url or default_broker
            backend_url = backend_url or default_backend
        self.app = Celery(
            "token_worker_client", broker=broker_url, backend=backend_url, set_as_current=False
        )
        self.app.conf.update(
            {
                "task_serializer": "json",
                "accept_content": ["json"],
                "result_accept_content": ["json"],
                "broker_connection_retry_on_startup": True,
                # A publish that fails on the connection is sent again, the same message (same
                # task id), before TokenUnavailable: Celery's retry, made explicit.
                "task_publish_retry": True,
                "task_publish_retry_policy": PUBLISH_RETRY,
                **publisher_confirms(broker_url),
                **(config or {}),
            }
        )
        if signer is not None:
            sign_messages(self.app, signer)

    def attempt(self, request: Request, timeout: float) -> Any:
        """Send ``request`` (again: same task id, same kwargs) and wait up to ``timeout``.
        Raises Celery's ``TimeoutError`` when no result came."""
        try:
            result = self.app.send_task(
                request.task, kwargs=request.kwargs, task_id=request.task_id
            )
        except OperationalError as exc:
            raise TokenUnavailable(
                f"{request.task}: the broker refused the message ({exc}). {request.retry_with}",
                task=request.task,
                task_id=request.task_id,
                idempotency_key=request.idempotency_key,
            ) from exc
        try:
            value = result.get(timeout=timeout, propagate=False, interval=RESULT_POLL_INTERVAL)
        except CeleryTimeoutError:
            # Stop listening for it (the next attempt listens again): a task that never
            # finishes would otherwise keep its subscription and waiter for good.
            remove = getattr(result.backend, "remove_pending_result", None)
            if remove is not None:
                remove(result)
            raise
        if result.state != "SUCCESS":
            raise TaskFailed(
                task=request.task,
                task_id=request.task_id,
                idempotency_key=request.idempotency_key,
                state=result.state,
                error=f"{type(value).__name__}: {value}",
            )
        return value

    def timed_out(self, request: Request, attempts: int) -> TokenTimeout:
        return TokenTimeout(
            task=request.task,
            task_id=request.task_id,
            idempotency_key=request.idempotency_key,
            attempts=attempts,
            retry_with=request.retry_with,
        )

    def close(self) -> None:
        self.app.close()


class TokenClient:
    """Calls the token worker's tasks and returns their results as pydantic models.

    Each method is the contract task of the same name (``reservations.expire`` is
    :meth:`expire_reservations`) with its keyword arguments, and returns the task's result model
    or a :class:`~token_worker_client.models.Failure` for a refusal (``.unwrap()`` raises it as
    a :class:`~token_worker_client.errors.TokenRefused` subclass instead).

    Every call is sent with one task id and, for the tasks that take one, one
    ``idempotency_key`` (generated unless given). When no result comes within ``timeout``
    seconds the same message is sent again, up to ``retries`` times, so a retry never applies
    twice; then :class:`~token_worker_client.errors.TokenTimeout` carries the key (or, for
    ``reset_balance``, ``capture``, ``release``, ``renew_user``, ``sweep`` and
    ``debit_batch``, whose key is the task id, the ``task_id``) to retry with later.
    Safe to share between threads.
    """

    def __init__(
        self,
        broker_url: str | None = None,
        backend_url: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        config: Mapping[str, Any] | None = None,
        producer: str | None = None,
        producer_key: str | None = None,
    ) -> None:
        """Without URLs, :func:`default_urls`: ``TOKENS_BROKER_URL`` and
        ``TOKENS_RESULT_BACKEND``, else the worker's ``make run``. ``config``: extra Celery
        settings (say, ``broker_transport_options``). ``producer`` and ``producer_key`` (else
        ``TOKENS_PRODUCER_NAME`` and ``TOKENS_PRODUCER_KEY``): sign every message as that
        producer, for a worker with ``TOKENS_PRODUCERS`` set."""
        self.timeout = timeout
        self.retries = retries
        self.transport = Transport(
            broker_url, backend_url, config, producer_signer(producer, producer_key)
        )

    def __enter__(self) -> TokenClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self.transport.close()

    def _call(self, spec: Spec[R], arguments: dict[str, Any]) -> R:
        request = prepare(spec, arguments)
        if isinstance(request, Failure):
            return spec.parse(request.model_dump())
        timeout = arguments.get("timeout") or self.timeout
        for _ in range(self.retries + 1):
            try:
                return spec.parse(self.transport.attempt(request, timeout))
            except CeleryTimeoutError:
                continue
        raise self.transport.timed_out(request, self.retries + 1)

    # --- accounts ----------------------------------------------------------------------------

    def open_account(
        self,
        *,
        user_id: str,
        tier: str = "Gift",
        initial_balance: int = 0,
        subscription_expires_at: Date | None = None,
        last_renewal_at: Date | None = None,
        parent_id: str | None = None,
        timeout: float | None = None,
    ) -> OpenAccountOut | Failure:
        """With ``parent_id``, a member of the parent's pool: it spends the pool's tokens."""
        return self._call(contract.OPEN_ACCOUNT, locals())

    def set_tier(
        self,
        *,
        user_id: str,
        tier: str,
        subscription_expires_at: Date | None = None,
        timeout: float | None = None,
    ) -> BalanceOut | Failure:
        return self._call(contract.SET_TIER, locals())

    def get_balance(
        self, *, user_id: str, as_of: Date | None = None, timeout: float | None = None
    ) -> BalanceOut | Failure:
        return self._call(contract.GET_BALANCE, locals())

    def can_afford(
        self, *, user_id: str, operation_type: str, timeout: float | None = None
    ) -> CanAffordOut | Failure:
        return self._call(contract.CAN_AFFORD, locals())

    # --- movements ---------------------------------------------------------------------------

    def debit(
        self,
        *,
        user_id: str,
        amount: int,
        operation_type: str,
        allow_overdraft: bool = False,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> MovementOut | Failure:
        return self._call(contract.DEBIT, locals())

    def debit_batch(
        self,
        *,
        debits: Sequence[DebitIn | Mapping[str, Any]],
        task_id: str | None = None,
        timeout: float | None = None,
    ) -> DebitBatchOut | Failure:
        """Items without an ``idempotency_key`` are keyed by the batch's task id."""
        return self._call(contract.DEBIT_BATCH, locals())

    def credit(
        self,
        *,
        user_id: str,
        amount: int,
        operation_type: str = "purchase",
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        grant_kind: str = "purchased",
        expires_at: Date | None = None,
        priority: int | None = None,
        timeout: float | None = None,
    ) -> MovementOut | Failure:
        """v1.1: the tokens become a ``purchased`` (or ``promo``) grant; ``expires_at`` must be
        in the future; ``priority`` defaults by kind (purchased 50, promo 20)."""
        return self._call(contract.CREDIT, locals())

    def charge(
        self,
        *,
        user_id: str,
        operation_type: str,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> MovementOut | Failure:
        return self._call(contract.CHARGE, locals())

    def refund(
        self,
        *,
        user_id: str,
        amount: int,
        reason: str | None = None,
        original_entry_id: str | int | None = None,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> MovementOut | Failure:
        return self._call(contract.REFUND, locals())

    def reset_balance(
        self,
        *,
        user_id: str,
        new_balance: int,
        reason: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        timeout: float | None = None,
    ) -> MovementOut | Failure:
        return self._call(contract.RESET_BALANCE, locals())

    # --- reservations ------------------------------------------------------------------------

    def reserve(
        self,
        *,
        user_id: str,
        amount: int | None = None,
        operation_type: str | None = None,
        ttl_seconds: int = 900,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        overcapture_limit: int = 0,
        timeout: float | None = None,
    ) -> ReserveOut | Failure:
        """A capture may take up to ``amount + overcapture_limit`` (v1.1)."""
        return self._call(contract.RESERVE, locals())

    def capture(
        self,
        *,
        reservation_id: str,
        amount: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        timeout: float | None = None,
    ) -> CaptureOut | Failure:
        return self._call(contract.CAPTURE, locals())

    def release(
        self,
        *,
        reservation_id: str,
        reason: str | None = None,
        task_id: str | None = None,
        timeout: float | None = None,
    ) -> ReleaseOut | Failure:
        return self._call(contract.RELEASE, locals())

    def extend(
        self,
        *,
        reservation_id: str,
        amount: int = 0,
        ttl_seconds: int | None = None,
        task_id: str | None = None,
        timeout: float | None = None,
    ) -> ExtendOut | Failure:
        """Hold ``amount`` more and/or move the expiry to now + ``ttl_seconds`` (at most 7 days
        after the reservation was made)."""
        return self._call(contract.EXTEND, locals())

    def expire_reservations(self, *, timeout: float | None = None) -> ExpireOut | Failure:
        return self._call(contract.EXPIRE_RESERVATIONS, locals())

    # --- grants ------------------------------------------------------------------------------

    def grants(
        self, *, user_id: str, include_ended: bool = False, timeout: float | None = None
    ) -> GrantsOut | Failure:
        """Active grants in burn order, then (``include_ended``) ended ones newest first."""
        return self._call(contract.GRANTS, locals())

    def set_limit(
        self,
        *,
        user_id: str,
        name: str,
        max_tokens: int | None = None,
        period: str | None = None,
        rolling: bool = False,
        timeout: float | None = None,
    ) -> LimitsOut | Failure:
        """Cap what the account and every account below it spend per ``period`` (``minute``,
        ``hour``, ``day``, ``week``, ``month``; UTC calendar windows, or the last 60 s ... 30 days
        with ``rolling``); ``max_tokens=None`` removes the limit ``name``."""
        return self._call(contract.SET_LIMIT, locals())

    def limits(self, *, user_id: str, timeout: float | None = None) -> LimitsOut | Failure:
        """Every limit that applies: the account's, then each account's above it, by name."""
        return self._call(contract.LIMITS, locals())

    def expire_grants(self, *, timeout: float | None = None) -> GrantsExpireOut | Failure:
        return self._call(contract.EXPIRE_GRANTS, locals())

    # --- events ------------------------------------------------------------------------------

    def set_alerts(
        self, *, user_id: str, thresholds: list[int], timeout: float | None = None
    ) -> AlertsOut | Failure:
        """Up to 4 thresholds of ``tokens_available``: each crossing down is one ``balance.low``
        event, each crossing back up one ``balance.recovered`` (``[]``: none)."""
        return self._call(contract.SET_ALERTS, locals())

    def set_auto_topup(
        self,
        *,
        user_id: str,
        below: int | None,
        amount: int | None = None,
        max_per_month: int | None = None,
        timeout: float | None = None,
    ) -> AlertsOut | Failure:
        """A ``topup.requested`` event when a change leaves ``tokens_available`` below ``below``
        (``None``: off); credit ``amount`` with its ``idempotency_key`` to fulfil it."""
        return self._call(contract.SET_AUTO_TOPUP, locals())

    def list_events(
        self,
        *,
        after: str | None = None,
        limit: int = 100,
        user_id: str | None = None,
        timeout: float | None = None,
    ) -> EventsOut | Failure:
        """The events after the cursor ``after``; pass the result's ``next`` back for the rest
        (none is ever skipped). Webhooks: ``token_worker_client.events.verify_webhook``."""
        return self._call(contract.LIST_EVENTS, locals())

    # --- ledger ------------------------------------------------------------------------------

    def user_entries(
        self,
        *,
        user_id: str,
        operation_type: str | None = None,
        start_date: Date | None = None,
        end_date: Date | None = None,
        limit: int = 50,
        offset: int = 0,
        timeout: float | None = None,
    ) -> EntriesOut | Failure:
        return self._call(contract.USER_ENTRIES, locals())

    def entries_by_type(
        self,
        *,
        operation_type: str,
        start_date: Date | None = None,
        end_date: Date | None = None,
        limit: int = 50,
        offset: int = 0,
        timeout: float | None = None,
    ) -> EntriesOut | Failure:
        return self._call(contract.ENTRIES_BY_TYPE, locals())

    def total_spent(
        self,
        *,
        user_id: str,
        start_date: Date | None = None,
        end_date: Date | None = None,
        timeout: float | None = None,
    ) -> TotalOut | Failure:
        return self._call(contract.TOTAL_SPENT, locals())

    def total_earned(
        self,
        *,
        user_id: str,
        start_date: Date | None = None,
        end_date: Date | None = None,
        timeout: float | None = None,
    ) -> TotalOut | Failure:
        return self._call(contract.TOTAL_EARNED, locals())

    def statistics(
        self,
        *,
        user_id: str,
        start_date: Date | None = None,
        end_date: Date | None = None,
        timeout: float | None = None,
    ) -> StatisticsOut | Failure:
        return self._call(contract.STATISTICS, locals())

    def delete_old_entries(
        self, *, older_than: Date, timeout: float | None = None
    ) -> DeletedOut | Failure:
        return self._call(contract.DELETE_OLD_ENTRIES, locals())

    def reconcile(
        self, *, user_id: str | None = None, timeout: float | None = None
    ) -> ReconcileOut | Failure:
        return self._call(contract.RECONCILE, locals())

    def verify(
        self, *, user_id: str | None = None, timeout: float | None = None
    ) -> VerifyOut | Failure:
        return self._call(contract.VERIFY, locals())

    # --- renewals ----------------------------------------------------------------------------

    def check_eligibility(
        self, *, user_id: str, timeout: float | None = None
    ) -> EligibilityOut | Failure:
        return self._call(contract.CHECK_ELIGIBILITY, locals())

    def renew_user(
        self, *, user_id: str, task_id: str | None = None, timeout: float | None = None
    ) -> RenewOut | Failure:
        return self._call(contract.RENEW_USER, locals())

    def sweep(
        self,
        *,
        tier: str | None = None,
        limit: int | None = None,
        dry_run: bool = False,
        continue_on_error: bool = True,
        task_id: str | None = None,
        timeout: float | None = None,
    ) -> SweepOut | Failure:
        return self._call(contract.SWEEP, locals())

    def due(
        self, *, tier: str | None = None, limit: int | None = None, timeout: float | None = None
    ) -> DueOut | Failure:
        return self._call(contract.DUE, locals())

    # --- health ------------------------------------------------------------------------------

    def ping(self, *, timeout: float | None = None) -> PingOut | Failure:
        """``health.ping``: broker, worker, database and result backend all answer."""
        return self._call(contract.PING, locals())
