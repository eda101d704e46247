"""``AsyncTokenClient``: the same methods as ``TokenClient``, awaitable.

Celery's send and result wait block, so each attempt runs in a thread of the client's own pool
(``max_concurrency`` threads; further calls wait their turn) and the event loop never blocks.
Each thread keeps its own result-backend connection (Celery's backend is per thread), so many
concurrent calls never share a Redis pub/sub connection. A cancelled call stops waiting at once;
its thread finishes the attempt in the background (at most ``timeout``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any, TypeVar

from celery.exceptions import TimeoutError as CeleryTimeoutError

from token_worker_client import contract
from token_worker_client.client import Date, Transport, producer_signer
from token_worker_client.contract import Spec, prepare
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

R = TypeVar("R")


class AsyncTokenClient:
    """:class:`~token_worker_client.client.TokenClient` for asyncio: the same methods, the same
    keys, timeouts and retries, each a coroutine. Safe for many concurrent calls."""

    def __init__(
        self,
        broker_url: str | None = None,
        backend_url: str | None = None,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        max_concurrency: int = 32,
        config: Mapping[str, Any] | None = None,
        producer: str | None = None,
        producer_key: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.transport = Transport(
            broker_url, backend_url, config, producer_signer(producer, producer_key)
        )
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="token-worker-client")

    async def __aenter__(self) -> AsyncTokenClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Wait for attempts still running in the pool, then close the connections."""
        await asyncio.get_running_loop().run_in_executor(None, self._close)

    def _close(self) -> None:
        self._pool.shutdown(wait=True)
        self.transport.close()

    async def _call(self, spec: Spec[R], arguments: dict[str, Any]) -> R:
        request = prepare(spec, arguments)
        if isinstance(request, Failure):
            return spec.parse(request.model_dump())
        timeout = arguments.get("timeout") or self.timeout
        loop = asyncio.get_running_loop()
        for _ in range(self.retries + 1):
            try:
                value = await loop.run_in_executor(
                    self._pool, self.transport.attempt, request, timeout
                )
            except CeleryTimeoutError:
                continue
            return spec.parse(value)
        raise self.transport.timed_out(request, self.retries + 1)

    # --- accounts ----------------------------------------------------------------------------

    async def open_account(
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
        return await self._call(contract.OPEN_ACCOUNT, locals())

    async def set_tier(
        self,
        *,
        user_id: str,
        tier: str,
        subscription_expires_at: Date | None = None,
        timeout: float | None = None,
    ) -> BalanceOut | Failure:
        return await self._call(contract.SET_TIER, locals())

    async def get_balance(
        self, *, user_id: str, as_of: Date | None = None, timeout: float | None = None
    ) -> BalanceOut | Failure:
        return await self._call(contract.GET_BALANCE, locals())

    async def can_afford(
        self, *, user_id: str, operation_type: str, timeout: float | None = None
    ) -> CanAffordOut | Failure:
        return await self._call(contract.CAN_AFFORD, locals())

    # --- movements ---------------------------------------------------------------------------

    async def debit(
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
        return await self._call(contract.DEBIT, locals())

    async def debit_batch(
        self,
        *,
        debits: Sequence[DebitIn | Mapping[str, Any]],
        task_id: str | None = None,
        timeout: float | None = None,
    ) -> DebitBatchOut | Failure:
        """Items without an ``idempotency_key`` are keyed by the batch's task id."""
        return await self._call(contract.DEBIT_BATCH, locals())

    async def credit(
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
        return await self._call(contract.CREDIT, locals())

    async def charge(
        self,
        *,
        user_id: str,
        operation_type: str,
        metadata: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> MovementOut | Failure:
        return await self._call(contract.CHARGE, locals())

    async def refund(
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
        return await self._call(contract.REFUND, locals())

    async def reset_balance(
        self,
        *,
        user_id: str,
        new_balance: int,
        reason: str | None = None,
        metadata: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        timeout: float | None = None,
    ) -> MovementOut | Failure:
        return await self._call(contract.RESET_BALANCE, locals())

    # --- reservations ------------------------------------------------------------------------

    async def reserve(
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
        return await self._call(contract.RESERVE, locals())

    async def capture(
        self,
        *,
        reservation_id: str,
        amount: int | None = None,
        metadata: Mapping[str, Any] | None = None,
        task_id: str | None = None,
        timeout: float | None = None,
    ) -> CaptureOut | Failure:
        return await self._call(contract.CAPTURE, locals())

    async def release(
        self,
        *,
        reservation_id: str,
        reason: str | None = None,
        task_id: str | None = None,
        timeout: float | None = None,
    ) -> ReleaseOut | Failure:
        return await self._call(contract.RELEASE, locals())

    async def extend(
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
        return await self._call(contract.EXTEND, locals())

    async def expire_reservations(self, *, timeout: float | None = None) -> ExpireOut | Failure:
        return await self._call(contract.EXPIRE_RESERVATIONS, locals())

    # --- grants ------------------------------------------------------------------------------

    async def grants(
        self, *, user_id: str, include_ended: bool = False, timeout: float | None = None
    ) -> GrantsOut | Failure:
        """Active grants in burn order, then (``include_ended``) ended ones newest first."""
        return await self._call(contract.GRANTS, locals())

    async def set_limit(
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
        return await self._call(contract.SET_LIMIT, locals())

    async def limits(self, *, user_id: str, timeout: float | None = None) -> LimitsOut | Failure:
        """Every limit that applies: the account's, then each account's above it, by name."""
        return await self._call(contract.LIMITS, locals())

    async def expire_grants(self, *, timeout: float | None = None) -> GrantsExpireOut | Failure:
        return await self._call(contract.EXPIRE_GRANTS, locals())

    # --- events ------------------------------------------------------------------------------

    async def set_alerts(
        self, *, user_id: str, thresholds: list[int], timeout: float | None = None
    ) -> AlertsOut | Failure:
        """Up to 4 thresholds of ``tokens_available``: each crossing down is one ``balance.low``
        event, each crossing back up one ``balance.recovered`` (``[]``: none)."""
        return await self._call(contract.SET_ALERTS, locals())

    async def set_auto_topup(
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
        return await self._call(contract.SET_AUTO_TOPUP, locals())

    async def list_events(
        self,
        *,
        after: str | None = None,
        limit: int = 100,
        user_id: str | None = None,
        timeout: float | None = None,
    ) -> EventsOut | Failure:
        """The events after the cursor ``after``; pass the result's ``next`` back for the rest
        (none is ever skipped). Webhooks: ``token_worker_client.events.verify_webhook``."""
        return await self._call(contract.LIST_EVENTS, locals())

    # --- ledger ------------------------------------------------------------------------------

    async def user_entries(
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
        return await self._call(contract.USER_ENTRIES, locals())

    async def entries_by_type(
        self,
        *,
        operation_type: str,
        start_date: Date | None = None,
        end_date: Date | None = None,
        limit: int = 50,
        offset: int = 0,
        timeout: float | None = None,
    ) -> EntriesOut | Failure:
        return await self._call(contract.ENTRIES_BY_TYPE, locals())

    async def total_spent(
        self,
        *,
        user_id: str,
        start_date: Date | None = None,
        end_date: Date | None = None,
        timeout: float | None = None,
    ) -> TotalOut | Failure:
        return await self._call(contract.TOTAL_SPENT, locals())

    async def total_earned(
        self,
        *,
        user_id: str,
        start_date: Date | None = None,
        end_date: Date | None = None,
        timeout: float | None = None,
    ) -> TotalOut | Failure:
        return await self._call(contract.TOTAL_EARNED, locals())

    async def statistics(
        self,
        *,
        user_id: str,
        start_date: Date | None = None,
        end_date: Date | None = None,
        timeout: float | None = None,
    ) -> StatisticsOut | Failure:
        return await self._call(contract.STATISTICS, locals())

    async def delete_old_entries(
        self, *, older_than: Date, timeout: float | None = None
    ) -> DeletedOut | Failure:
        return await self._call(contract.DELETE_OLD_ENTRIES, locals())

    async def reconcile(
        self, *, user_id: str | None = None, timeout: float | None = None
    ) -> ReconcileOut | Failure:
        return await self._call(contract.RECONCILE, locals())

    async def verify(
        self, *, user_id: str | None = None, timeout: float | None = None
    ) -> VerifyOut | Failure:
        return await self._call(contract.VERIFY, locals())

    # --- renewals ----------------------------------------------------------------------------

    async def check_eligibility(
        self, *, user_id: str, timeout: float | None = None
    ) -> EligibilityOut | Failure:
        return await self._call(contract.CHECK_ELIGIBILITY, locals())

    async def renew_user(
        self, *, user_id: str, task_id: str | None = None, timeout: float | None = None
    ) -> RenewOut | Failure:
        return await self._call(contract.RENEW_USER, locals())

    async def sweep(
        self,
        *,
        tier: str | None = None,
        limit: int | None = None,
        dry_run: bool = False,
        continue_on_error: bool = True,
        task_id: str | None = None,
        timeout: float | None = None,
    ) -> SweepOut | Failure:
        return await self._call(contract.SWEEP, locals())

    async def due(
        self, *, tier: str | None = None, limit: int | None = None, timeout: float | None = None
    ) -> DueOut | Failure:
        return await self._call(contract.DUE, locals())

    # --- health ------------------------------------------------------------------------------

    async def ping(self, *, timeout: float | None = None) -> PingOut | Failure:
        """``health.ping``: broker, worker, database and result backend all answer."""
        return await self._call(contract.PING, locals())
