"""Alembic environment: the database URL comes from the project settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from migrations.partitions import include_name, include_object
from models.tables import Base
from worker.db import make_engine
from worker.settings import get_settings

target_metadata = Base.metadata


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        include_name=include_name,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url") or get_settings().migrate_url
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=get_settings().migrate_url, target_metadata=target_metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
