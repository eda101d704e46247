"""Layers point down only: tasks/ -> worker/ -> accounting/ -> models/ -> the producer client
(client/, a distribution of its own). The domain gets its rules and event hooks through seams of
its own (accounting/config.py, accounting/events.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

# What each layer must never import (at module level or inside a function).
FORBIDDEN = {
    "models": {"accounting", "worker", "tasks", "beat_schedule"},
    "accounting": {"worker", "tasks", "beat_schedule"},
    "worker": {"tasks"},
    "client/src/token_worker_client": {"models", "accounting", "worker", "tasks", "beat_schedule"},
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_point_down(layer: str) -> None:
    offending = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & FORBIDDEN[layer])
        for path in sorted((ROOT / layer).rglob("*.py"))
    }
    assert {p: bad for p, bad in offending.items() if bad} == {}
