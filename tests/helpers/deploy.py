"""Helpers for the deploy/ tests: the shipped rules and dashboard, PromQL metric names, tools."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from . import ROOT

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus/raflora-rules.yml"
RULES_TEST = DEPLOY / "prometheus/raflora-rules.test.yml"
DASHBOARD = DEPLOY / "grafana/raflora-dashboard.json"
KUSTOMIZE = DEPLOY / "kubernetes"

# What the tests put in place of the dashboard's Grafana variables.
DASHBOARD_VARIABLES = {"$__rate_interval": "1m", "$job": "raflora", "$federation": ".*"}

_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without"}


def tool(name: str) -> str:
    """A command-line tool the dev extra installs into the venv (next to this Python)."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: `make install` installs it (pyproject's dev extra)")
    return found


def debian_tool(name: str) -> str:
    """promtool / prometheus, from Debian's `prometheus` package, which .ci/run installs."""
    found = shutil.which(name)
    if found is None:
        pytest.skip(
            f"{name} not found: install Debian's prometheus package "
            "(apt-get install prometheus; .ci/run does this before make test)"
        )
    return found


def run(cmd: list[str], *, cwd: Path | None = None, timeout: float = 120) -> str:
    """Run a tool; fail the test with its output unless it exits 0."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{output}"
    return output


def load_rules() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return doc


def all_rules(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in doc["groups"] for rule in group["rules"]]


def rules_with_short_for(seconds: int) -> dict[str, Any]:
    """The shipped rules with every ``for:`` cut to ``seconds``; expressions untouched."""
    doc = copy.deepcopy(load_rules())
    for rule in all_rules(doc):
        if "for" in rule:
            rule["for"] = f"{seconds}s"
    return doc


def load_dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def substitute(expr: str) -> str:
    for name, value in DASHBOARD_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown dashboard variable in {expr!r}"
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with the variables substituted) of every panel target."""
    out = []
    for panel in load_dashboard()["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], substitute(target["expr"])))
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords dropped)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+\w+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][\w:]*", s):
        word = m.group()
        if s[m.end() :].lstrip().startswith("(") or word.lower() in _PROMQL_WORDS:
            continue  # a function call or an operator keyword
        names.add(word)
    return names


def exported_series_names(metrics_text: str) -> set[str]:
    """Every series name a /metrics scrape declares (families with no samples yet included)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
    }
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        for suffix in suffixes.get(family.type, ("",)):
            names.add(family.name + suffix)
        names.update(sample.name for sample in family.samples)
    return names
