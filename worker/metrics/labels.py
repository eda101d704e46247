"""Label values, bounded: a refusal reports the operation type it was asked for, which may be
anything a producer sent, so only the configured ones become label values (likewise queues)."""

from __future__ import annotations

from functools import cache
from typing import Any

from worker.metrics.definitions import MOVED, OTHER

_known_types: frozenset[str] = frozenset()
_queues: frozenset[str] = frozenset()


def configure(known_types: frozenset[str], queues: frozenset[str]) -> None:
    """The operation types and queues that become label values (the rest are ``other``)."""
    global _known_types, _queues
    _known_types, _queues = known_types, queues


def known_queue(name: str) -> str:
    return name if name in _queues else OTHER


def operation_type_label(operation_type: Any) -> str:
    if not isinstance(operation_type, str):
        return ""
    return operation_type if operation_type in _known_types else OTHER


_periods = frozenset(("minute", "hour", "day", "week", "month"))


def period_label(period: Any) -> str:
    """A spend limit's period (five values; anything else is ``other``)."""
    return period if period in _periods else OTHER


def queue_label(delivery_info: Any) -> str:
    key = delivery_info.get("routing_key") if isinstance(delivery_info, dict) else None
    return key if key in _queues else OTHER


@cache
def of(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, remembered: prometheus_client checks and converts the label
    values on every call, which was most of the handlers' cost (the values are bounded)."""
    return metric.labels(*labels)


def moved(operation_type: str, amount: int) -> None:
    if amount:
        of(MOVED, operation_type, "credit" if amount > 0 else "debit").inc(abs(amount))
