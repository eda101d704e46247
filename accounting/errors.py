"""Business refusals: each has a stable code and the exact message of the contract."""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """A refusal that changes nothing. The task returns it as ``success: false``, with the
    ``fields`` a refusal adds (``limit``, for ``LIMIT_EXCEEDED``)."""

    def __init__(self, code: str, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.fields = fields


def validation_error(message: str) -> DomainError:
    return DomainError("VALIDATION_ERROR", message)


def expires_at_not_future() -> DomainError:
    """A grant asked to end at or before the movement's time (checked under the account lock)."""
    return validation_error("Invalid arguments: expires_at: must be in the future")


def user_not_found() -> DomainError:
    return DomainError("USER_NOT_FOUND", "User not found")


def insufficient_tokens(required: int, available: int) -> DomainError:
    return DomainError(
        "INSUFFICIENT_TOKENS", f"Insufficient tokens. Required: {required}, Available: {available}"
    )


def invalid_amount(what: str) -> DomainError:
    """``what`` is Debit, Credit, Refund, Reserve or Capture."""
    return DomainError("INVALID_AMOUNT", f"{what} amount must be positive")


def negative_balance() -> DomainError:
    return DomainError("NEGATIVE_BALANCE", "Balance cannot be negative")


def unknown_operation_type(name: str) -> DomainError:
    return DomainError("UNKNOWN_OPERATION_TYPE", f"Unknown operation type: {name}")


def not_chargeable(name: str) -> DomainError:
    return DomainError("NOT_CHARGEABLE", f"Operation type {name} has no cost")


def idempotency_conflict() -> DomainError:
    return DomainError("IDEMPOTENCY_CONFLICT", "Idempotency key reused with different parameters")


def refund_exceeds_original(charged: int, refunded: int) -> DomainError:
    return DomainError(
        "REFUND_EXCEEDS_ORIGINAL",
        f"Refund exceeds original charge. Charged: {charged}, Refunded: {refunded}",
    )


def entry_not_found() -> DomainError:
    return DomainError("ENTRY_NOT_FOUND", "Original entry not found")


def reservation_not_found() -> DomainError:
    return DomainError("RESERVATION_NOT_FOUND", "Reservation not found")


def reservation_not_active(status: str) -> DomainError:
    return DomainError("RESERVATION_NOT_ACTIVE", f"Reservation is {status}")


def capture_exceeds_reservation(reserved: int, requested: int) -> DomainError:
    return DomainError(
        "CAPTURE_EXCEEDS_RESERVATION",
        f"Capture exceeds reservation. Reserved: {reserved}, Requested: {requested}",
    )


def merged_metadata_too_large(size: int, limit: int) -> DomainError:
    """A capture's metadata merged with its reservation's (and the id) is over the bound."""
    return validation_error(
        f"Invalid arguments: metadata: merged with the reservation's metadata it is {size} "
        f"bytes serialized; at most {limit} allowed"
    )


def not_due(days: int) -> DomainError:
    return DomainError("NOT_DUE", f"Next renewal in {days} days")


def subscription_expired() -> DomainError:
    return DomainError("SUBSCRIPTION_EXPIRED", "Subscription expired")


def below_reserved(reserved: int) -> DomainError:
    return DomainError(
        "BELOW_RESERVED", f"Balance cannot go below reserved tokens. Reserved: {reserved}"
    )


def parent_not_found() -> DomainError:
    return DomainError("PARENT_NOT_FOUND", "Parent account not found")


def member_account(pool: str) -> DomainError:
    return DomainError("MEMBER_ACCOUNT", f"Account is a member of {pool}: move tokens on the pool")


class LimitExceeded(DomainError):
    """``LIMIT_EXCEEDED``: its own type, for the ``limit.reached`` a refusal writes once its
    statement has rolled back (``limits.note_refused``)."""

    def __init__(self, limit: dict[str, Any], requested: int) -> None:
        super().__init__(
            "LIMIT_EXCEEDED",
            f"Spend limit exceeded: {limit['name']} on {limit['user_id']}. "
            f"Limit: {limit['max_tokens']}, Used: {limit['used']}, Requested: {requested}",
            limit=limit,
        )


def limit_exceeded(limit: dict[str, Any], requested: int) -> LimitExceeded:
    """``limit``: the refusing limit as ``tokens.limits`` lists it (``used`` before the
    request)."""
    return LimitExceeded(limit, requested)


def unauthorized(producer: str | None, task: str) -> DomainError:
    """A message the worker takes from no allowed producer (``TOKENS_PRODUCERS``): ``producer``
    is the one the message names, None when it names none the worker knows."""
    if producer is None:
        return DomainError("UNAUTHORIZED", "Unsigned message")
    return DomainError("UNAUTHORIZED", f"Producer {producer} may not send {task}")
