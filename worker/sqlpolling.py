"""kombu's SQLAlchemy transport and Celery's database result backend, polling often enough for a
task round trip in tens of milliseconds (the embedded default's fallback where no Valkey wheel
exists, and any ``sqla+`` broker or ``db+`` result backend; worker/config.py installs both).

Neither can wait for a row to appear, so both poll. Stock, a round trip took about a second: the
transport sleeps its ``polling_interval`` (1 s) whenever every queue is empty, and
``AsyncResult.get`` reads the backend every ``interval`` (0.5 s). The transport's interval is
meant to come from ``broker_transport_options``, but kombu's SQLAlchemy channel hands every
transport option to ``create_engine``, which refuses ``polling_interval``; this channel keeps the
transport's own options out of the engine's.
"""

from __future__ import annotations

from typing import Any

from celery.backends.database import DatabaseBackend as CeleryDatabaseBackend
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import create_engine
from sqlalchemy.engine import Engine

#: Seconds the worker sleeps when no queue has a message (kombu's default: 1).
BROKER_POLLING_INTERVAL = 0.01
#: The longest a caller waiting for a result sleeps between reads (Celery's default: 0.5).
RESULT_POLLING_INTERVAL = 0.02

# kombu's own list (the channel's _engine_from_config) plus what the transport reads itself.
_NOT_ENGINE_OPTIONS = frozenset(
    {
        "queue_tablename",
        "message_tablename",
        "callback",
        "errback",
        "max_retries",
        "interval_start",
        "interval_step",
        "interval_max",
        "retry_errors",
        "polling_interval",
    }
)


class Channel(kombu_sqla.Channel):
    def _engine_from_config(self) -> Engine:
        conninfo = self.connection.client
        options = {
            k: v for k, v in conninfo.transport_options.items() if k not in _NOT_ENGINE_OPTIONS
        }
        return create_engine(engine_url(conninfo.hostname), **options)


def broker_url(url: str) -> str:
    """What to give kombu as ``broker_url`` with :class:`Transport`: ``url`` without ``sqla+``
    and without its driver (a ``+`` in the scheme makes kombu pick a transport by that name)."""
    scheme, _, rest = url.removeprefix("sqla+").partition("://")
    return f"{scheme.partition('+')[0]}://{rest}"


def engine_url(url: str) -> str:
    """The SQLAlchemy URL for :func:`broker_url`'s: PostgreSQL through psycopg 3."""
    scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if scheme == "postgresql" else url


class Transport(kombu_sqla.Transport):
    """``broker_transport`` for a SQLAlchemy broker URL as :func:`broker_url` gives it."""

    Channel = Channel


class DatabaseBackend(CeleryDatabaseBackend):  # type: ignore[misc]
    """``result_backend`` for a database URL (given as ``database_url``): a caller's
    ``interval`` is the longest wait between reads, never more than
    :data:`RESULT_POLLING_INTERVAL` (one indexed read of a local table each)."""

    def wait_for(
        self,
        task_id: str,
        timeout: float | None = None,
        interval: float = RESULT_POLLING_INTERVAL,
        no_ack: bool = True,
        on_interval: Any = None,
    ) -> Any:
        return super().wait_for(
            task_id,
            timeout=timeout,
            interval=min(interval, RESULT_POLLING_INTERVAL),
            no_ack=no_ack,
            on_interval=on_interval,
        )
