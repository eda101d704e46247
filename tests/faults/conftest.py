"""The table of the fault suite (``make faults``): one row per fault, printed at the end of the
run and written to var/faults/results-<time>.md."""

from __future__ import annotations

import time

import pytest

from tests.devenv import ROOT
from tests.faults.load import Report
from tests.faults.test_under_load import DEBITS, FULL, REPORTS, SWEEP_LINES, SWEEP_USERS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not (REPORTS or SWEEP_LINES):
        return
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "make faults" if FULL else "pytest tests/faults"
    lines = [
        f"Faults under load, {DEBITS} debits each ({command}, {stamp}):",
        "",
        Report.HEADER,
        *(r.row() for r in REPORTS),
    ]
    if SWEEP_LINES:
        lines += [
            "",
            f"Background work, {SWEEP_USERS} users each:",
            "",
            "| fault | users done before the work was sent again | users done at the end |"
            " done twice | reconcile mismatches |",
            "| --- | ---: | ---: | ---: | ---: |",
            *SWEEP_LINES,
        ]
    text = "\n".join(lines)
    terminalreporter.write_line("")
    for line in lines:
        terminalreporter.write_line(line)
    out = ROOT / "var" / "faults" / f"results-{time.strftime('%Y%m%dT%H%M%S')}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
