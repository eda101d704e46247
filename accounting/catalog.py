"""The price list and tiers: their defaults, and look-ups in the configured ones."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from accounting.config import rules
from accounting.errors import not_chargeable, unknown_operation_type, validation_error

DEFAULT_PRICES: dict[str, int] = {
    "image_generation": 10,
    "sora_image": 10,
    "product_card": 10,
    "chatgpt_message": 5,
    "refund": 0,
    "purchase": 0,
    "monthly_reset": 0,
    "adjustment": 0,
    "expiry": 0,
}


class Tier(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    tokens: int = Field(ge=0)
    period_days: int = Field(default=30, ge=1)
    # v1.1 renewal policy: "add" (v1: the allowance never expires, renewals add up) or "reset"
    # (a renewal expires what is left of the previous allowance and rollover, keeping at most
    # ``rollover_max`` of the allowance as a rollover grant until the next renewal).
    renewal: Literal["add", "reset"] = "add"
    rollover_max: int = Field(default=0, ge=0)


DEFAULT_TIERS: dict[str, Tier] = {
    "Gift": Tier(tokens=100),
    "Professional": Tier(tokens=2000),
    "Business": Tier(tokens=10000),
}

# Types the ledger itself writes; always on the list, at no cost.
SYSTEM_OPERATION_TYPES = ("refund", "purchase", "monthly_reset", "adjustment", "expiry")

# Tiers whose allowance never lapses with ``subscription_expires_at``.
FREE_TIERS = frozenset({"Gift"})


def known_operation(name: str) -> str:
    if name not in rules().prices:
        raise unknown_operation_type(name)
    return name


def cost_of(name: str) -> int:
    """The listed cost of an operation, zero included (refuses unknown ones)."""
    return rules().prices[known_operation(name)]


def price_of(name: str) -> int:
    """The cost of a chargeable operation (refuses unknown and free ones)."""
    cost = rules().prices.get(name)
    if cost is None:
        raise unknown_operation_type(name)
    if cost <= 0:
        raise not_chargeable(name)
    return cost


def tier_of(name: str, field: str = "tier") -> Tier:
    tiers = rules().tiers
    if name not in tiers:
        raise validation_error(f"{field}: unknown tier {name!r}; known: {', '.join(tiers)}")
    return tiers[name]
