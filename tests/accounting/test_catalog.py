"""accounting/catalog.py: the price list and tiers, default and configured."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from accounting import catalog
from accounting.errors import DomainError
from worker.settings import Tier, get_settings

DEFAULT_PRICES = {
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


def refusal(action: Callable[..., object], *args: str) -> tuple[str, str]:
    with pytest.raises(DomainError) as info:
        action(*args)
    return info.value.code, info.value.message


def test_default_price_list() -> None:
    assert {name: catalog.cost_of(name) for name in DEFAULT_PRICES} == DEFAULT_PRICES
    assert get_settings().prices == DEFAULT_PRICES


def test_known_operation() -> None:
    assert catalog.known_operation("purchase") == "purchase"
    assert refusal(catalog.known_operation, "teleport") == (
        "UNKNOWN_OPERATION_TYPE",
        "Unknown operation type: teleport",
    )
    # Names match exactly.
    assert refusal(catalog.known_operation, "Purchase")[0] == "UNKNOWN_OPERATION_TYPE"


def test_cost_of_includes_free_operations() -> None:
    assert catalog.cost_of("chatgpt_message") == 5
    assert catalog.cost_of("refund") == 0
    assert refusal(catalog.cost_of, "teleport") == (
        "UNKNOWN_OPERATION_TYPE",
        "Unknown operation type: teleport",
    )


def test_price_of_refuses_free_and_unknown_operations() -> None:
    assert catalog.price_of("sora_image") == 10
    for free in ("refund", "purchase", "monthly_reset", "adjustment"):
        assert refusal(catalog.price_of, free) == (
            "NOT_CHARGEABLE",
            f"Operation type {free} has no cost",
        )
    assert refusal(catalog.price_of, "teleport") == (
        "UNKNOWN_OPERATION_TYPE",
        "Unknown operation type: teleport",
    )


def test_default_tiers() -> None:
    assert catalog.tier_of("Gift") == Tier(tokens=100, period_days=30)
    assert catalog.tier_of("Professional") == Tier(tokens=2000, period_days=30)
    assert catalog.tier_of("Business") == Tier(tokens=10000, period_days=30)


def test_unknown_tier_names_the_field() -> None:
    assert refusal(catalog.tier_of, "Platinum") == (
        "VALIDATION_ERROR",
        "tier: unknown tier 'Platinum'; known: Gift, Professional, Business",
    )
    code, message = refusal(catalog.tier_of, "gift", "new_tier")
    assert code == "VALIDATION_ERROR" and message.startswith("new_tier: unknown tier 'gift'")


@pytest.fixture
def configured(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Settings read again from a custom price list and tiers; the defaults come back after."""
    monkeypatch.setenv("TOKENS_PRICES", '{"haiku": 3, "free_sample": 0}')
    monkeypatch.setenv("TOKENS_TIERS", '{"Starter": {"tokens": 50, "period_days": 7}}')
    get_settings.cache_clear()
    yield
    monkeypatch.undo()
    get_settings.cache_clear()


def test_configured_prices_and_tiers_replace_the_defaults(configured: None) -> None:
    assert catalog.price_of("haiku") == 3
    assert catalog.cost_of("free_sample") == 0
    assert refusal(catalog.price_of, "free_sample")[0] == "NOT_CHARGEABLE"
    assert refusal(catalog.cost_of, "image_generation")[0] == "UNKNOWN_OPERATION_TYPE"
    assert catalog.tier_of("Starter") == Tier(tokens=50, period_days=7)
    assert refusal(catalog.tier_of, "Gift") == (
        "VALIDATION_ERROR",
        "tier: unknown tier 'Gift'; known: Starter",
    )
