"""A role the worker runs as, which may read and append to the ledger and never change it

``tokens_worker`` may SELECT, INSERT, UPDATE and DELETE the rows of every table but two: ledger
entries and their splits, which it may only SELECT and INSERT (no UPDATE, DELETE or TRUNCATE),
and ``alembic_version``, which it only reads. Tables made by later migrations get the same
grants (default privileges of the role that runs the migrations). Pruning removes entries
through ``tokens_prune``, now SECURITY DEFINER: it runs as the tables' owner. The role is created
NOLOGIN (roles belong to the cluster, so it may exist already, made for another database);
``tokens migrate`` with ``TOKENS_WORKER_DB_PASSWORD`` lets it log in. Migrations connect with
``TOKENS_MIGRATION_DATABASE_URL`` (the owner), the worker with ``TOKENS_DATABASE_URL``.

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from migrations import snapshot

revision: str = "0026"
down_revision: str | None = "0025"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLE = "tokens_worker"
APPEND_ONLY = "ledger_entries, entry_grants"


def upgrade() -> None:
    op.execute(
        f"""DO $do$
        BEGIN
            IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{ROLE}') THEN
                CREATE ROLE {ROLE} NOLOGIN;
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- made meanwhile by the migration of another database of this cluster
        END
        $do$"""
    )
    op.execute(f"GRANT USAGE ON SCHEMA public TO {ROLE}")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {ROLE}")
    op.execute(f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {ROLE}")
    op.execute(f"REVOKE INSERT, UPDATE, DELETE ON alembic_version FROM {ROLE}")
    op.execute(f"REVOKE UPDATE, DELETE, TRUNCATE ON {APPEND_ONLY} FROM {ROLE}")
    op.execute(
        "ALTER DEFAULT PRIVILEGES IN SCHEMA public"
        f" GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {ROLE}"
    )
    op.execute(
        "ALTER DEFAULT PRIVILEGES IN SCHEMA public"
        f" GRANT USAGE, SELECT, UPDATE ON SEQUENCES TO {ROLE}"
    )
    snapshot.apply("0026", "tokens_prune", "tokens_refund")


def downgrade() -> None:
    snapshot.apply("0023", "tokens_prune")
    snapshot.apply("0021", "tokens_refund")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON SEQUENCES FROM {ROLE}")
    op.execute(f"ALTER DEFAULT PRIVILEGES IN SCHEMA public REVOKE ALL ON TABLES FROM {ROLE}")
    op.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {ROLE}")
    op.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {ROLE}")
    op.execute(f"REVOKE USAGE ON SCHEMA public FROM {ROLE}")
    # The role stays: other databases of the cluster may use it.
