"""One settings object, read from ``TOKENS_*`` environment variables.

With no variable set, everything points at SQLite files under ``./var/`` (the embedded default),
so the worker runs on a bare machine; PostgreSQL and Redis are the production path.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from accounting import config as domain_config
from accounting.catalog import (
    DEFAULT_PRICES,
    DEFAULT_TIERS,
    FREE_TIERS,
    SYSTEM_OPERATION_TYPES,
    Tier,
)

__all__ = [
    "DEFAULT_PRICES",
    "DEFAULT_TIERS",
    "FREE_TIERS",
    "SYSTEM_OPERATION_TYPES",
    "Settings",
    "Tier",
    "get_settings",
]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENS_", extra="ignore")

    var_dir: Path = Path("var")
    database_url: str | None = None
    broker_url: str | None = None
    result_backend: str | None = None
    redbeat_redis_url: str | None = None

    visibility_timeout: int = Field(default=300, ge=10)
    result_expires: int = Field(default=86_400, ge=60)
    task_soft_time_limit: int = Field(default=120, ge=1)
    task_time_limit: int = Field(default=150, ge=1)
    task_max_retries: int = Field(default=5, ge=0)
    retry_backoff_max: int = Field(default=30, ge=1)
    worker_concurrency: int | None = None
    task_events: bool = True
    db_pool_size: int = Field(default=5, ge=1)

    prices: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    tiers: dict[str, Tier] = Field(default_factory=lambda: dict(DEFAULT_TIERS))

    renewal_cron: str = "0 2 * * *"
    reconcile_cron: str = "30 3 * * *"
    reservation_expiry_seconds: int = Field(default=60, ge=1)
    # Users per sweep chunk: one task, one statement, one transaction each. The sweep fans out
    # in chunks, so no renewals task needs a time limit beyond the global one.
    sweep_chunk_size: int = Field(default=5000, ge=1)

    # A key replays its first outcome for this long; then the record is pruned, and the same
    # key applies again. Far longer than any redelivery (visibility timeout) or producer retry.
    idempotency_retention_days: int = Field(default=7, ge=1)
    idempotency_prune_cron: str = "45 3 * * *"

    # Messages the worker decodes (worker/poison.py): how deep any argument or header may nest,
    # and the largest body. 32 MiB admits the largest valid tokens.debit_batch (1000 items at
    # every bound, 8 KiB of metadata each in the characters JSON escapes most: about 25 MB).
    max_message_depth: int = Field(default=32, ge=4, le=100)
    max_message_bytes: int = Field(default=32 * 1024 * 1024, ge=4096)

    # Prometheus metrics (worker/metrics.py), served by a worker's main process when a port is
    # set. The directory holds every process's metric files; it is emptied when the worker
    # starts, so each worker needs its own (default: var/metrics/<node name>).
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_addr: str = "0.0.0.0"
    metrics_dir: Path | None = None

    # Dotted paths ("package.module:function" or "package.module.function") connected at start-up.
    balance_changed_handlers: list[str] = Field(default_factory=list)
    operation_completed_handlers: list[str] = Field(default_factory=list)
    operation_retried_handlers: list[str] = Field(default_factory=list)
    message_refused_handlers: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        bad = {k: v for k, v in self.prices.items() if v < 0}
        if bad:
            raise ValueError(f"prices must not be negative: {bad}")
        # TOKENS_PRICES replaces the whole list; the types the ledger writes stay on it.
        for name in SYSTEM_OPERATION_TYPES:
            if self.prices.setdefault(name, 0) != 0:
                raise ValueError(f"prices: {name} is written by the ledger and must cost 0")
        if not self.task_soft_time_limit < self.task_time_limit < self.visibility_timeout:
            raise ValueError(
                "need task_soft_time_limit < task_time_limit < visibility_timeout, or a task "
                "still running is delivered a second time"
            )
        return self

    @property
    def embedded(self) -> bool:
        """True when running on the SQLite default (no servers)."""
        return self.db_url.startswith("sqlite")

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir / 'tokens.sqlite'}"

    @property
    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.var_dir / 'broker.sqlite'}"

    @property
    def backend(self) -> str:
        return self.result_backend or f"db+sqlite:///{self.var_dir / 'results.sqlite'}"

    @property
    def broker_is_redis(self) -> bool:
        return self.broker.startswith(("redis://", "rediss://"))


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


# The domain reads its rules (prices, tiers, chunk sizes) through its own seam; these settings
# are what it sees in the worker, the CLI and the tests.
domain_config.configure(get_settings)
