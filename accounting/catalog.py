"""The configured price list and tiers."""

from __future__ import annotations

from accounting.errors import not_chargeable, unknown_operation_type, validation_error
from worker.settings import Tier, get_settings


def known_operation(name: str) -> str:
    if name not in get_settings().prices:
        raise unknown_operation_type(name)
    return name


def cost_of(name: str) -> int:
    """The listed cost of an operation, zero included (refuses unknown ones)."""
    return get_settings().prices[known_operation(name)]


def price_of(name: str) -> int:
    """The cost of a chargeable operation (refuses unknown and free ones)."""
    cost = get_settings().prices.get(name)
    if cost is None:
        raise unknown_operation_type(name)
    if cost <= 0:
        raise not_chargeable(name)
    return cost


def tier_of(name: str, field: str = "tier") -> Tier:
    tiers = get_settings().tiers
    if name not in tiers:
        raise validation_error(f"{field}: unknown tier {name!r}; known: {', '.join(tiers)}")
    return tiers[name]
