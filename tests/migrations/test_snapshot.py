"""sql/ is the source of every function, migrations/snapshots/ what each revision installed
(migrations/snapshot.py): the functions installed at head are the files, and the migrations
hold no SQL of their own nor import each other."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import text

from migrations import snapshot
from tests.support import ROOT
from worker.db import get_engine

BODY = re.compile(r"\bAS \$fn\$(.*)\$fn\$;\s*\Z", re.S)
FUNCTION = re.compile(r"CREATE OR REPLACE FUNCTION (\w+)\(")
SOURCES = sorted((ROOT / "sql").rglob("*.sql"))


def installed() -> dict[str, str]:
    """Each project function at head (the scratch database is migrated to head), its body."""
    with get_engine().connect() as conn:
        rows = conn.execute(
            text(
                "SELECT p.proname, p.prosrc FROM pg_proc p"
                " JOIN pg_namespace n ON n.oid = p.pronamespace"
                " WHERE n.nspname = current_schema() AND p.proname LIKE 'tokens\\_%'"
            )
        ).all()
    return {name: body for name, body in rows}


def test_every_function_at_head_is_its_source_file() -> None:
    at_head = installed()
    sources: dict[str, str] = {}
    for path in SOURCES:
        source = path.read_text()
        match = FUNCTION.search(source)
        assert match is not None and match.group(1) == path.stem, f"{path}: defines {path.stem}"
        body = BODY.search(source)
        assert body is not None, f"{path}: no $fn$ body"
        sources[path.stem] = body.group(1)
    assert sorted(sources) == sorted(at_head), "a function with no source, or a source not applied"
    stale = [name for name, body in sources.items() if at_head[name] != body]
    assert stale == [], (
        f"sources changed but not migrated (python -m migrations.snapshot REV): {stale}"
    )


def test_every_source_is_frozen_in_a_snapshot() -> None:
    assert snapshot.changed() == []


def test_migrations_apply_snapshots_and_import_no_other_migration() -> None:
    for path in sorted((ROOT / "migrations" / "versions").glob("0*.py")):
        code = path.read_text()
        assert "CREATE OR REPLACE FUNCTION" not in code, f"{path.name}: a function body in Python"
        assert "import_module" not in code and "migrations.versions" not in code, path.name
        for revision, name in re.findall(r'snapshot\.apply\(\s*"(\d+)",\s*"(\w+)"', code):
            assert Path(snapshot.SNAPSHOTS / revision / f"{name}.sql").is_file(), (revision, name)
