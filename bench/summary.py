"""The seam between each benchmark and ``bench.all``'s table: one JSON line per goal measured.

A benchmark calls :func:`record` once per goal of issue 12 it measures, at the end of its report,
with the figure and the baseline measured in the same run. When ``TOKENS_BENCH_SUMMARY`` names a
file (``bench.all`` sets it), the row is appended to it as one JSON line; otherwise nothing
happens, so a benchmark run on its own prints exactly what it printed before.

:func:`render` turns the rows (and the runs that failed) into the Markdown table ``make bench``
prints.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV = "TOKENS_BENCH_SUMMARY"
# Read when a benchmark imports this module too: ``Scratch.export()`` (tests/devenv.py) clears
# every TOKENS_* variable but TOKENS_TEST_* from the environment before the benchmark runs.
_AT_IMPORT = os.environ.get(ENV)


@dataclass(frozen=True)
class Row:
    """One goal as one benchmark measured it. ``ratio`` is figure over baseline in the direction
    ``target`` states; ``met`` is None for a measure with no goal (e.g. the brokers)."""

    goal: str
    figure: str
    baseline: str
    ratio: float | None
    target: str
    met: bool | None
    command: str
    failed: bool = False

    @classmethod
    def from_json(cls, line: str) -> Row:
        data: dict[str, Any] = json.loads(line)
        ratio = data.get("ratio")
        met = data.get("met")
        return cls(
            goal=str(data["goal"]),
            figure=str(data.get("figure", "")),
            baseline=str(data.get("baseline", "")),
            ratio=None if ratio is None else float(ratio),
            target=str(data.get("target", "")),
            met=None if met is None else bool(met),
            command=str(data.get("command", "")),
            failed=bool(data.get("failed", False)),
        )


def invocation() -> str:
    """How this process was started, as ``python -m bench.x --args`` (for the command column)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = f"python -m {spec.name}" if spec is not None else f"python {sys.argv[0]}"
    return " ".join([head, *(shlex.quote(a) for a in sys.argv[1:])])


def record(
    goal: str,
    figure: str,
    baseline: str,
    ratio: float | None,
    target: str,
    met: bool | None,
    command: str | None = None,
) -> None:
    """Append one row to the file ``TOKENS_BENCH_SUMMARY`` names (now, or when this module was
    imported); a no-op when it is unset."""
    path = os.environ.get(ENV) or _AT_IMPORT
    if not path:
        return
    row = Row(goal, figure, baseline, ratio, target, met, command or invocation())
    with Path(path).open("a", encoding="utf-8") as f:
        f.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")


def read(path: Path) -> list[Row]:
    """The rows in a summary file (none if it does not exist)."""
    if not path.exists():
        return []
    return [Row.from_json(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def failure(command: str, why: str) -> Row:
    """The row standing for a benchmark run that failed."""
    return Row(command, f"failed: {why}", "", None, "", False, command, failed=True)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def verdict(row: Row) -> str:
    if row.failed:
        return "**FAILED**"
    if row.met is None:
        return "n/a"
    return "met" if row.met else "**missed**"


def render(rows: Iterable[Row], heading: Iterable[str] = ()) -> str:
    """The Markdown table: ``heading`` lines first, then goal | figure | baseline | ratio |
    target | met, then the commands that produced the rows."""
    rows = list(rows)
    lines = [*heading]
    if lines:
        lines.append("")
    lines += [
        "| goal | figure | baseline | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        cells = (r.goal, r.figure, r.baseline, ratio, r.target, verdict(r))
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    commands = list(dict.fromkeys(r.command for r in rows if r.command))
    if commands:
        lines += ["", "Commands:", ""]
        lines += [f"- `{c}`" for c in commands]
    return "\n".join(lines) + "\n"
