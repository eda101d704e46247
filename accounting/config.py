"""The domain's settings seam: what the rules are (prices, tiers, chunk sizes), handed in by
whoever runs the domain (the worker configures it from its settings object at import), so the
domain never imports the worker. Unconfigured, the contract's defaults apply."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from accounting.catalog import Tier


class Rules(Protocol):
    @property
    def prices(self) -> dict[str, int]: ...

    @property
    def tiers(self) -> dict[str, Tier]: ...

    @property
    def sweep_chunk_size(self) -> int: ...


def _default_prices() -> dict[str, int]:
    from accounting.catalog import DEFAULT_PRICES

    return dict(DEFAULT_PRICES)


def _default_tiers() -> dict[str, Tier]:
    from accounting.catalog import DEFAULT_TIERS

    return dict(DEFAULT_TIERS)


@dataclass(frozen=True)
class DefaultRules:
    prices: dict[str, int] = field(default_factory=_default_prices)
    tiers: dict[str, Tier] = field(default_factory=_default_tiers)
    sweep_chunk_size: int = 5000


@cache
def _defaults() -> Rules:
    return DefaultRules()


_source: Callable[[], Rules] = _defaults


def configure(source: Callable[[], Rules]) -> None:
    """Read the rules from ``source()`` from now on (called on every look-up, so a source that
    caches, like the worker's ``get_settings``, decides when changes are seen)."""
    global _source
    _source = source


def rules() -> Rules:
    return _source()
