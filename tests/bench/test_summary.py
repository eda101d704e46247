"""bench.summary (the seam each benchmark records its goals through) and bench.all's table,
with stand-in benchmarks: no real benchmark runs here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import all as bench_all
from bench import summary


def test_record_is_a_no_op_without_the_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(summary.ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    summary.record("g", "1/s", "2/s", 0.5, ">= 0.7", False)
    assert list(tmp_path.iterdir()) == []


def test_record_appends_one_json_line_per_goal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "summary.jsonl"
    monkeypatch.setenv(summary.ENV, str(path))
    summary.record("rate", "80/s", "100/s", 0.8, ">= 0.7", True, command="python -m bench.x")
    summary.record("brokers", "5/s", "Redis 4/s", 1.25, "(no goal)", None)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[0])["ratio"] == 0.8
    first, second = summary.read(path)
    assert first == summary.Row("rate", "80/s", "100/s", 0.8, ">= 0.7", True, "python -m bench.x")
    assert second.met is None and second.ratio == 1.25
    assert second.command  # this process's own invocation when none is given


def test_read_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert summary.read(tmp_path / "none.jsonl") == []


def test_render_one_row_per_goal_with_its_verdict() -> None:
    rows = [
        summary.Row("debit vs no-op", "80/s", "no-op 100/s", 0.8, ">= 0.7", True, "c1"),
        summary.Row("cpu", "3 ms", "no-op 1 ms", 3.0, "<= 1.5x", False, "c1"),
        summary.Row("a | b", "5/s", "Redis 4/s", None, "(no goal)", None, "c2"),
        summary.failure("python -m bench.gone", "exit 2"),
    ]
    table = summary.render(rows, ["`make bench`, 2026-12-04", "- machine: test"])
    lines = table.splitlines()
    assert lines[:3] == ["`make bench`, 2026-12-04", "- machine: test", ""]
    assert lines[3] == "| goal | figure | baseline | ratio | target | met |"
    assert lines[5] == "| debit vs no-op | 80/s | no-op 100/s | 0.80 | >= 0.7 | met |"
    assert lines[6] == "| cpu | 3 ms | no-op 1 ms | 3.00 | <= 1.5x | **missed** |"
    assert lines[7] == "| a \\| b | 5/s | Redis 4/s |  | (no goal) | n/a |"
    assert lines[8].startswith("| python -m bench.gone | failed: exit 2 |")
    assert lines[8].endswith("| **FAILED** |")
    assert lines[-3:] == ["- `c1`", "- `c2`", "- `python -m bench.gone`"]


class _Stand(bench_all.Bench):
    """A stand-in benchmark: a ``python -c`` script instead of a bench module."""

    def command(self, quick: bool) -> list[str]:
        return ["-c", self.module]


# As a benchmark does: import the seam, then Scratch.export() clears every TOKENS_* variable
# (but TOKENS_TEST_*) before the benchmark records.
RECORDS = (
    "import os; from bench import summary; print('measuring'); "
    "[os.environ.pop(k) for k in list(os.environ) if k.startswith('TOKENS_')]; "
    "summary.record('goal', '9/s', '10/s', 0.9, '>= 0.7', True, command='stand')"
)


def test_all_collects_rows_marks_failures_and_writes_the_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_all, "OUT", tmp_path)
    monkeypatch.setattr(bench_all, "machine", lambda: "test machine")
    monkeypatch.setattr(
        bench_all,
        "BENCHES",
        (
            _Stand(RECORDS),
            _Stand("import sys; sys.exit(3)"),
            _Stand("print('no rows')"),
        ),
    )
    assert bench_all.main(["--quick"]) == 1
    out = capsys.readouterr().out
    assert "| goal | 9/s | 10/s | 0.90 | >= 0.7 | met |" in out
    assert out.count("**FAILED**") == 2
    assert "failed: exit 3" in out and "failed: recorded nothing" in out
    assert "machine: test machine" in out
    (md,) = tmp_path.glob("summary-*-quick.md")
    assert "| goal | 9/s |" in md.read_text()
    (log,) = tmp_path.glob("bench-*.log")
    assert "measuring" in log.read_text() and "no rows" in log.read_text()


def test_all_exits_zero_when_every_benchmark_records(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(bench_all, "OUT", tmp_path)
    monkeypatch.setattr(bench_all, "machine", lambda: "test machine")
    monkeypatch.setattr(bench_all, "BENCHES", (_Stand(RECORDS),))
    assert bench_all.main([]) == 0
    (md,) = tmp_path.glob("summary-*.md")
    assert not md.name.endswith("-quick.md")


def test_make_bench_arguments_are_kept() -> None:
    full = {b.module: b.command(quick=False) for b in bench_all.BENCHES}
    assert full["grant_expiry"] == ["-m", "bench.grant_expiry", "--users", "100000"]
    assert full["ledger_reads"] == ["-m", "bench.ledger_reads"]
    assert len(full) == 10
    assert full["ledger_prune"] == ["-m", "bench.ledger_prune"]
