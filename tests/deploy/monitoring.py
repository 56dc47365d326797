"""What the monitoring tests share: the files in deploy/prometheus and deploy/grafana, the Debian programs
that check them, the metric names in a PromQL expression, and the names a real server exports."""

from __future__ import annotations

import json
import re
import shutil
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULE_FILES = [PROMETHEUS_DIR / "llmk-alerts.yml", PROMETHEUS_DIR / "llmk-availability.yml"]
RULE_TESTS = PROMETHEUS_DIR / "tests" / "llmk-alerts.test.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "llmk-dashboard.json"
# Series Prometheus writes itself for every target, whatever the target exports.
SYNTHETIC = {"up"}
# Grafana's variables, as the e2e test substitutes them for a plain Prometheus query.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$job": ".*", "$instance": ".*"}


def program(*names: str) -> str:
    """The path of the first of `names` found (on PATH or in /usr/bin); skips the test when none is."""
    for name in names:
        if found := shutil.which(name) or shutil.which(name, path="/usr/bin"):
            return found
    pytest.skip(f"{' or '.join(names)} is not installed (Debian: `make system-packages` installs it)")


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of the shipped Prometheus rule files."""
    return [
        rule
        for path in RULE_FILES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_expressions() -> list[str]:
    """The PromQL of every panel target, and the selector inside each templating `label_values(...)`."""
    board = dashboard()
    exprs = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            found = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            assert found, f"templating variable {variable['name']}: unexpected query {query!r}"
            exprs.append(found.group(1))
    return exprs


# ------------------------------------------------------------------------ metric names in PromQL

_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names `expr` selects: identifiers outside strings, label matchers, ranges and grouping
    clauses that are not function calls or keywords (`sum by (le) (rate(x_bucket{code="5.."}[5m]))` -> x_bucket)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings may hold anything, `$job` included
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    return {
        name
        for name, call in _IDENTIFIER.findall(text)
        if not call and name.lower() not in _KEYWORDS and not re.fullmatch(r"\d\w*", name)
    }


def exported_names(metrics_text: str) -> tuple[set[str], set[str]]:
    """(every series name the exposition can hold, the names with a sample in it) for a /metrics body.

    A labelled metric that has not been used yet has its `# TYPE` line but no sample, so names come from
    each family's type (a counter `x` is the series `x_total`, a histogram `x_bucket`, `x_sum`, `x_count`).
    """
    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"]}
    possible, sampled = set(), set()
    for family in text_string_to_metric_families(metrics_text):
        possible.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
        sampled.update(sample.name for sample in family.samples)
    return possible | sampled, sampled
