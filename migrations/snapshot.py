"""The SQL a revision applies, frozen: ``migrations/snapshots/<revision>/<name>.sql``.

The functions' sources live under ``sql/`` (one file per function, in a folder per domain). When
a revision is made, ``python -m migrations.snapshot REVISION`` copies each changed source into
that revision's snapshot, which is never edited after: the source moves on, the snapshot keeps
what that revision installed. A migration applies its own revision's files and, to go down, an
earlier revision's; no migration imports another.
"""

from __future__ import annotations

import sys
from importlib.resources import files
from pathlib import Path

from alembic import op


def read(revision: str, name: str) -> str:
    return (files("migrations") / "snapshots" / revision / f"{name}.sql").read_text()


def apply(revision: str, *names: str) -> None:
    """Run each named file of ``revision``'s snapshot, in order."""
    for name in names:
        op.execute(read(revision, name))


# --- making a revision's snapshot (from a clone: the sources are not installed) ---------------

SOURCES = Path(__file__).resolve().parent.parent / "sql"
SNAPSHOTS = Path(__file__).resolve().parent / "snapshots"


def latest(name: str, before: str | None = None) -> Path | None:
    """The newest snapshot of ``name`` (a revision's file), of a revision before ``before``."""
    found = [
        path
        for path in sorted(SNAPSHOTS.glob(f"*/{name}.sql"))
        if before is None or path.parent.name < before
    ]
    return found[-1] if found else None


def changed() -> list[Path]:
    """The source files whose text differs from their newest snapshot (or that have none)."""
    return [
        source
        for source in sorted(SOURCES.rglob("*.sql"))
        if (frozen := latest(source.stem)) is None or frozen.read_text() != source.read_text()
    ]


def freeze(revision: str) -> list[str]:
    """Copy every changed source into ``revision``'s snapshot; the names to apply, in order."""
    target = SNAPSHOTS / revision
    target.mkdir(parents=True, exist_ok=True)
    names = []
    for source in changed():
        (target / source.name).write_text(source.read_text())
        names.append(source.stem)
    return names


if __name__ == "__main__":
    # python -m migrations.snapshot REVISION: freeze what changed under sql/ for a new revision.
    frozen = freeze(sys.argv[1])
    print("\n".join(frozen) if frozen else "nothing changed under sql/")
