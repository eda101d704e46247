"""migrations/: the schema the migrations build is the one the models describe, and each data
migration carries existing rows over."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, create_engine, text

from models.tables import Base
from worker.db import get_engine
from worker.devenv import PG_ADMIN_URL
from worker.migrate import upgrade


@pytest.fixture
def blank_database() -> Iterator[str]:
    """A new, empty PostgreSQL database of its own (the migrations are the test)."""
    name = f"tokens_migrations_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = get_engine().url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def engine_for(url: str) -> Engine:
    return create_engine(url)


def test_the_migrated_schema_is_the_models_schema() -> None:
    with get_engine().connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []


def test_0002_carries_refunds_into_refund_totals(blank_database: str) -> None:
    upgrade(blank_database, "0001")
    engine = engine_for(blank_database)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    """
                    INSERT INTO accounts (user_id, tier, tokens_balance, tokens_reserved,
                                          tokens_spent, created_at, updated_at)
                    VALUES ('u', 'Gift', 95, 0, 15, now(), now());
                    INSERT INTO ledger_entries (id, user_id, kind, operation_type, tokens_amount,
                        balance_before, balance_after, original_entry_id, metadata, created_at)
                    VALUES (1, 'u', 'adjustment', 'adjustment', 100, 0, 100, NULL, '{}', now()),
                           (2, 'u', 'debit', 'image_generation', -30, 100, 70, NULL, '{}', now()),
                           (3, 'u', 'refund', 'refund', 10, 70, 80, 2, '{}', now()),
                           (4, 'u', 'refund', 'refund', 5, 80, 85, 2, '{}', now()),
                           (5, 'u', 'charge', 'image_generation', -10, 85, 75, NULL, '{}', now()),
                           (6, 'u', 'refund', 'refund', 20, 75, 95, NULL, '{}', now());
                    """
                )
            )
        upgrade(blank_database)
        with engine.connect() as conn:
            caps = conn.execute(
                text("SELECT entry_id, user_id, charged, refunded FROM refund_totals")
            ).all()
        assert [tuple(c) for c in caps] == [(2, "u", 30, 15)]
    finally:
        engine.dispose()
