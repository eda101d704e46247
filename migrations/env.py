"""Alembic environment: the database URL comes from the project settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from models.tables import Base
from worker.db import make_engine
from worker.settings import get_settings

target_metadata = Base.metadata


def run(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=sqlite,
        compare_type=True,
    )
    if not sqlite:
        with context.begin_transaction():
            context.run_migrations()
        return
    # Batch mode rebuilds a SQLite table (copy, drop, rename): with foreign keys enforced, the
    # drop fails as soon as other rows reference the table (accounts, in 0004). So they are off
    # for the migration, set on the driver connection before any transaction (SQLite ignores
    # the pragma inside one), and every reference is checked before the commit.
    driver = connection.connection.driver_connection
    assert driver is not None
    driver.execute("PRAGMA foreign_keys=OFF")
    try:
        with context.begin_transaction():
            context.run_migrations()
            dangling = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
            if dangling:
                raise RuntimeError(f"migration left foreign keys dangling: {dangling[:10]}")
    finally:
        driver.execute("PRAGMA foreign_keys=ON")


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url") or get_settings().db_url
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    context.configure(
        url=get_settings().db_url, target_metadata=target_metadata, literal_binds=True
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
