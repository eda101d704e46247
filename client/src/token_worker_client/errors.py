"""The contract's error codes, and what this client raises.

A refusal is a result (``Failure``), not an exception: ``result.unwrap()`` turns it into the
:class:`TokenRefused` subclass of its code for callers who prefer raising.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from token_worker_client.models import Failure


class ErrorCode(StrEnum):
    """Every ``error_code`` of the task contract (v1)."""

    USER_NOT_FOUND = "USER_NOT_FOUND"
    INSUFFICIENT_TOKENS = "INSUFFICIENT_TOKENS"
    INVALID_AMOUNT = "INVALID_AMOUNT"
    NEGATIVE_BALANCE = "NEGATIVE_BALANCE"
    UNKNOWN_OPERATION_TYPE = "UNKNOWN_OPERATION_TYPE"
    NOT_CHARGEABLE = "NOT_CHARGEABLE"
    VALIDATION_ERROR = "VALIDATION_ERROR"
    IDEMPOTENCY_CONFLICT = "IDEMPOTENCY_CONFLICT"
    REFUND_EXCEEDS_ORIGINAL = "REFUND_EXCEEDS_ORIGINAL"
    ENTRY_NOT_FOUND = "ENTRY_NOT_FOUND"
    RESERVATION_NOT_FOUND = "RESERVATION_NOT_FOUND"
    RESERVATION_NOT_ACTIVE = "RESERVATION_NOT_ACTIVE"
    CAPTURE_EXCEEDS_RESERVATION = "CAPTURE_EXCEEDS_RESERVATION"
    NOT_DUE = "NOT_DUE"
    SUBSCRIPTION_EXPIRED = "SUBSCRIPTION_EXPIRED"
    BELOW_RESERVED = "BELOW_RESERVED"
    # v1.2: pools and spend limits
    PARENT_NOT_FOUND = "PARENT_NOT_FOUND"
    MEMBER_ACCOUNT = "MEMBER_ACCOUNT"
    LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
    UNAUTHORIZED = "UNAUTHORIZED"


class TokenWorkerError(Exception):
    """Base of everything this client raises."""


class InvalidPayload(ValueError):
    """Kwargs the contract refuses; the message is the ``VALIDATION_ERROR`` text."""


# --- refusals -------------------------------------------------------------------------------


class TokenRefused(TokenWorkerError):
    """The worker refused the request (``success: false``); nothing changed."""

    def __init__(self, code: ErrorCode | str, message: str, result: Failure) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.result = result

    @staticmethod
    def of(result: Failure) -> TokenRefused:
        """The exception for ``result``: the subclass of its code (the base for a code newer
        than this client)."""
        cls = _BY_CODE.get(result.error_code, TokenRefused)
        return cls(result.error_code, result.error, result)


class UserNotFound(TokenRefused):
    pass


class InsufficientTokens(TokenRefused):
    pass


class InvalidAmount(TokenRefused):
    pass


class NegativeBalance(TokenRefused):
    pass


class UnknownOperationType(TokenRefused):
    pass


class NotChargeable(TokenRefused):
    pass


class InvalidArguments(TokenRefused):
    """``VALIDATION_ERROR``: the message names each bad field."""


class IdempotencyConflict(TokenRefused):
    pass


class RefundExceedsOriginal(TokenRefused):
    pass


class EntryNotFound(TokenRefused):
    pass


class ReservationNotFound(TokenRefused):
    pass


class ReservationNotActive(TokenRefused):
    pass


class CaptureExceedsReservation(TokenRefused):
    pass


class NotDue(TokenRefused):
    pass


class SubscriptionExpired(TokenRefused):
    pass


class BelowReserved(TokenRefused):
    pass


class ParentNotFound(TokenRefused):
    pass


class MemberAccount(TokenRefused):
    """Tokens enter a pool's tree through the pool: credits, resets, tiers and renewals of a
    member are refused."""


class LimitExceeded(TokenRefused):
    """A spend limit of the account or of an account above it refused the request; the
    refusing limit is ``result.limit``."""


class Unauthorized(TokenRefused):
    """The worker checks producers (``TOKENS_PRODUCERS``) and this message was unsigned, signed
    with a key it does not know, or for a task this producer may not send."""


_BY_CODE: dict[str, type[TokenRefused]] = {
    ErrorCode.USER_NOT_FOUND: UserNotFound,
    ErrorCode.INSUFFICIENT_TOKENS: InsufficientTokens,
    ErrorCode.INVALID_AMOUNT: InvalidAmount,
    ErrorCode.NEGATIVE_BALANCE: NegativeBalance,
    ErrorCode.UNKNOWN_OPERATION_TYPE: UnknownOperationType,
    ErrorCode.NOT_CHARGEABLE: NotChargeable,
    ErrorCode.VALIDATION_ERROR: InvalidArguments,
    ErrorCode.IDEMPOTENCY_CONFLICT: IdempotencyConflict,
    ErrorCode.REFUND_EXCEEDS_ORIGINAL: RefundExceedsOriginal,
    ErrorCode.ENTRY_NOT_FOUND: EntryNotFound,
    ErrorCode.RESERVATION_NOT_FOUND: ReservationNotFound,
    ErrorCode.RESERVATION_NOT_ACTIVE: ReservationNotActive,
    ErrorCode.CAPTURE_EXCEEDS_RESERVATION: CaptureExceedsReservation,
    ErrorCode.NOT_DUE: NotDue,
    ErrorCode.SUBSCRIPTION_EXPIRED: SubscriptionExpired,
    ErrorCode.BELOW_RESERVED: BelowReserved,
    ErrorCode.PARENT_NOT_FOUND: ParentNotFound,
    ErrorCode.MEMBER_ACCOUNT: MemberAccount,
    ErrorCode.LIMIT_EXCEEDED: LimitExceeded,
    ErrorCode.UNAUTHORIZED: Unauthorized,
}


# --- no answer ------------------------------------------------------------------------------


class TokenCallError(TokenWorkerError):
    """A call whose outcome this client does not know. ``task_id`` and ``idempotency_key``
    identify it: pass the same ``idempotency_key`` (or, for the tasks keyed by their task id,
    the same ``task_id``) to retry it without applying it twice."""

    def __init__(
        self, message: str, *, task: str, task_id: str, idempotency_key: str | None
    ) -> None:
        super().__init__(message)
        self.task = task
        self.task_id = task_id
        self.idempotency_key = idempotency_key


class TokenTimeout(TokenCallError):
    """No result within the timeout, after every retry. The request may still apply later
    (its messages stay queued): retried with the same key it applies at most once."""

    def __init__(
        self,
        *,
        task: str,
        task_id: str,
        idempotency_key: str | None,
        attempts: int,
        retry_with: str,
    ) -> None:
        super().__init__(
            f"{task}: no result after {attempts} attempt(s); it may still apply. {retry_with}",
            task=task,
            task_id=task_id,
            idempotency_key=idempotency_key,
        )
        self.attempts = attempts


class TokenUnavailable(TokenCallError):
    """The broker refused the message (connection lost after kombu's own retries)."""


class TaskFailed(TokenCallError):
    """The task ended in ``FAILURE`` (infrastructure trouble that outlasted the worker's own
    retries, or a time limit). Nothing was committed unless the failure hit the commit itself;
    a retry with the same key is safe either way."""

    def __init__(
        self,
        *,
        task: str,
        task_id: str,
        idempotency_key: str | None,
        state: str,
        error: str,
    ) -> None:
        super().__init__(
            f"{task}[{task_id}] {state}: {error}",
            task=task,
            task_id=task_id,
            idempotency_key=idempotency_key,
        )
        self.state = state
        self.error = error
