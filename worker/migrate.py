"""Apply the Alembic migrations (the only way the schema is created)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy.exc import SQLAlchemyError

import migrations


def alembic_config(url: str | None = None) -> Config:
    here = Path(migrations.__file__).parent
    config = Config(str(here / "alembic.ini"))
    config.set_main_option("script_location", str(here))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    from worker.preflight import Unavailable, database_revisions, not_running
    from worker.settings import get_settings

    settings = get_settings()
    if url is None and settings.embedded:
        # The embedded default's PostgreSQL not running: say what starts it (one line, the
        # CLI's Unavailable), not the driver's connection error.
        try:
            database_revisions(settings.db_url)
        except SQLAlchemyError:
            problem = not_running(settings.db_url)
            if problem:
                raise Unavailable(problem) from None
    command.upgrade(alembic_config(url), revision)


WORKER_ROLE = "tokens_worker"


def allow_worker_login(url: str, password: str) -> None:
    """Let the worker's role (migration 0026) log in with ``password``, set again each time."""
    from psycopg import sql

    from worker.db import make_engine

    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            raw = conn.connection.driver_connection
            statement = sql.SQL("ALTER ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.Identifier(WORKER_ROLE), sql.Literal(password)
            )
            conn.exec_driver_sql(statement.as_string(raw))
    finally:
        engine.dispose()
