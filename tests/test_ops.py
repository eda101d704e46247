"""ops/: the Prometheus alert rules pass ``promtool check rules`` and their own unit tests
(``promtool test rules``), and every metric the rules and the Grafana dashboard use is one the
worker exports (worker/metrics.py; tests/worker/test_metrics.py checks the worker serves no
other)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT
from worker.metrics import exported_names

RULES = ROOT / "ops" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "ops" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "ops" / "grafana" / "token-worker.json"
# Made by Prometheus itself for every scrape target.
PROMETHEUS_OWN = {"up"}


def promtool() -> str:
    """scripts/ensure-promtool.sh (run by ``make test``) puts it in the venv when the PATH has
    none. A missing promtool fails the test: the rules would go unchecked."""
    found = shutil.which("promtool") or ROOT / ".venv" / "bin" / "promtool"
    if not Path(found).exists():
        pytest.fail("promtool not found: run scripts/ensure-promtool.sh (make test does)")
    return str(found)


def run_promtool(*args: str) -> str:
    done = subprocess.run(
        [promtool(), *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_checks_the_rules() -> None:
    assert "SUCCESS" in run_promtool("check", "rules", str(RULES))


def test_the_alerts_fire_when_and_only_when_they_should() -> None:
    assert "SUCCESS" in run_promtool("test", "rules", str(RULE_TESTS))


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_the_rules_cover_what_operators_must_hear_about() -> None:
    alerts = {rule["alert"] for rule in rules() if "alert" in rule}
    assert {
        "TokenWorkerDown",
        "TokenRefusalRateSpike",
        "TokenReconcileMismatch",
        "TokenRenewalSweepLate",
        "TokenQueueBacklog",
        "TokenTaskWaitHigh",
    } <= alerts


_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
             "unless", "offset", "inf", "nan"}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, label names or matchers, durations, or Grafana's variables."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    expr = re.sub(r"\$\w+", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        if expr[match.end() :].lstrip().startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def test_metric_names_are_read_from_promql() -> None:
    assert metric_names(
        'histogram_quantile(0.95, sum by (le, queue_name) (rate(x_bucket{a="b{c}"}[5m])))'
        " / on () clamp_min(y_total offset 1d, 0.01) > 2 * 3600 and $var"
    ) == {"x_bucket", "y_total"}


def dashboard_exprs() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_the_dashboard_and_the_rules_use_only_what_the_worker_exports() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    used_by_rules = set().union(*(metric_names(rule["expr"]) for rule in rules()))
    used_by_dashboard = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    known = exported_names() | PROMETHEUS_OWN | recorded
    assert used_by_rules - known == set()
    assert used_by_dashboard - known == set()
    # Not vacuous: they use most of what there is.
    assert len(used_by_rules) >= 8 and len(used_by_dashboard) >= 20


def test_the_operator_guides_prometheus_config_is_valid(tmp_path: Path) -> None:
    guide = (ROOT / "docs" / "operators.md").read_text()
    found = re.search(r"```yaml\n(rule_files:.*?)```", guide, re.S)
    assert found is not None
    config = tmp_path / "prometheus.yml"
    config.write_text(found.group(1).replace("[alerts.yml]", f"[{RULES}]"))
    out = run_promtool("check", "config", str(config))
    assert "SUCCESS: 1 rule files found" in out
