"""Tests for deploy/: the Prometheus alert rules (promtool) and the Grafana dashboard.

``promtool`` comes with Debian's ``prometheus`` package (CI installs it, see .ci/run); without
it the promtool tests skip and say so, and the checks that need no promtool still run: every
metric the rules and the dashboard name is one the daemon exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from linescan.metrics import Metrics

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
ALERTS = DEPLOY / "prometheus-alerts.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
README = Path(__file__).resolve().parents[1] / "README.md"
ALERT_NAMES = (
    "LinescanDown", "LinescanNotReady", "LinescanFramesDropped", "LinescanFramesRejected",
    "LinescanLatencyHigh", "LinescanEngineErrors", "LinescanJournalErrors",
    "LinescanDefectRateSpike", "LinescanRepeatingDefect",
)  # fmt: skip


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip(
            "no promtool: `apt-get install prometheus` (CI installs it; see .ci/run) to check "
            "the alert rules with Prometheus' own parser"
        )
    return found


def exported_names() -> set[str]:
    """Every sample name a daemon's /metrics can carry (process metrics included)."""
    registry = CollectorRegistry()
    Metrics(registry, process=True)
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }


def dashboard_exprs(variables: bool = True) -> list[str]:
    """The panels' PromQL queries (and the variables' Grafana queries)."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    if variables:
        exprs += [v["definition"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def names_in(expr: str) -> set[str]:
    return set(re.findall(r"\b((?:linescan|process)_[a-z0-9_]+)", expr))


# --------------------------------------------------------------------------- alert rules


def test_the_rules_have_every_alert_the_issue_names() -> None:
    """Down, not ready, drops, rejections, latency, engine and journal errors, a defect-rate
    spike and a repeating defect."""
    names = re.findall(r"^\s*- alert: (\w+)$", ALERTS.read_text(encoding="utf-8"), re.M)
    assert sorted(names) == sorted(ALERT_NAMES)


def test_rules_and_dashboard_use_only_metrics_the_daemon_exports() -> None:
    """No rule or panel waits for a series that never comes."""
    exported = exported_names()
    rules = names_in(ALERTS.read_text(encoding="utf-8"))
    assert rules
    assert rules - exported == set()
    used = set().union(*(names_in(e) for e in dashboard_exprs()))
    assert used - exported == set()
    # the dashboard shows what an operator asks first
    for name in ("linescan_ready", "linescan_repeating_series", "linescan_defects_total"):
        assert name in used


def test_promtool_checks_the_rules_and_the_scrape_config() -> None:
    """`promtool check rules` and `promtool check config` (which loads the rules too)."""
    tool = promtool()
    for args in (
        ["check", "rules", str(ALERTS)],
        ["check", "config", str(DEPLOY / "prometheus.yml")],
    ):
        res = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr


def annotations(alert: str, labels: dict[str, str], value: str) -> dict[str, str]:
    """An alert's annotations as Prometheus renders them, for the few template forms used."""
    lines = ALERTS.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"      - alert: {alert}")
    out: dict[str, str] = {}
    i = start + 1
    while i < len(lines) and not lines[i].startswith("      - alert:"):
        line = lines[i]
        m = re.match(r"^ {10}(summary|description): (.*)$", line)
        if m and m[2] == ">-":
            block = []
            i += 1
            while i < len(lines) and lines[i].startswith(" " * 12):
                block.append(lines[i].strip())
                i += 1
            out[m[1]] = " ".join(block)
            continue
        if m:
            out[m[1]] = m[2].strip('"')
        i += 1

    def render(text: str) -> str:
        text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda g: labels[g[1]], text)
        return re.sub(r"\{\{ \$value( \| humanize)? \}\}", value, text)

    return {k: render(v) for k, v in out.items()}


def expect(alert: str, at: str, labels: dict[str, str] | None, value: str = "1") -> dict[str, Any]:
    """A promtool alert_rule_test: ``alert`` fires at ``at`` with ``labels``, or (None) not."""
    case: dict[str, Any] = {"eval_time": at, "alertname": alert, "exp_alerts": []}
    if labels is not None:
        case["exp_alerts"] = [
            {"exp_labels": labels, "exp_annotations": annotations(alert, labels, value)}
        ]
    return case


def test_the_alerts_fire_when_they_should_and_only_then(tmp_path: Path) -> None:
    """`promtool test rules` on synthetic series: each alert fires on its condition (after its
    `for`), not before, and not on what is normal (drops at shutdown, a steady defect rate)."""
    tool = promtool()
    a = {"instance": "line1:9108", "job": "linescan"}
    lbl = ",".join(f'{k}="{v}"' for k, v in a.items())
    series = [
        (f"up{{{lbl}}}", "1 1 0 0 0 0"),
        (f"linescan_ready{{{lbl}}}", "1 1 0 0 0 0"),
        (f'linescan_repeating_series{{{lbl},camera="cam0"}}', "0 0 1 1 1 1"),
        (f'linescan_frames_dropped_total{{{lbl},reason="overload"}}', "0 0 5 5 5 5"),
        (f'linescan_frames_dropped_total{{{lbl},reason="shutdown"}}', "0 9 9 9 9 9"),
        (f"linescan_engine_errors_total{{{lbl}}}", "0 0 0 0 0 0"),
    ]
    spike_series = [
        (f'linescan_defects_total{{{lbl},camera="cam0"}}', "0+1x360 380+20x30"),
        (f"linescan_lines_inspected_total{{{lbl}}}", "0+60000x400"),
    ]
    crit = {**a, "severity": "critical"}
    warn = {"instance": a["instance"], "severity": "warning"}
    tests = [
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in series],
            "alert_rule_test": [
                expect("LinescanDown", "2m", None),  # down since 2m, pending: `for: 1m`
                expect("LinescanDown", "3m", crit),
                expect("LinescanNotReady", "3m", None),  # `for: 2m`
                expect("LinescanNotReady", "4m", crit),
                expect("LinescanRepeatingDefect", "1m", None),
                expect(
                    "LinescanRepeatingDefect",
                    "3m",
                    {"instance": a["instance"], "camera": "cam0", "severity": "critical"},
                ),
                expect("LinescanFramesDropped", "1m", None),  # a shutdown drop is no alarm
                expect("LinescanFramesDropped", "4m", {**warn, "reason": "overload"}, "5"),
                expect("LinescanEngineErrors", "5m", None),
            ],
        },
        {
            "interval": "1m",
            "input_series": [{"series": s, "values": v} for s, v in spike_series],
            "alert_rule_test": [
                expect("LinescanDefectRateSpike", "300m", None),  # steady: one a minute
                expect("LinescanDefectRateSpike", "375m", warn),  # twenty a minute
            ],
        },
    ]
    spec = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests}
    path = tmp_path / "alerts.test.yml"
    path.write_text(json.dumps(spec, indent=1), encoding="utf-8")  # JSON is YAML
    res = subprocess.run([tool, "test", "rules", str(path)], capture_output=True, text=True,
                         timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- the dashboard


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    """Unique panel ids, panels on the 24-column grid, every panel on the chosen Prometheus
    data source with a query, the data source and daemon picked by variables."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert board["uid"] == "linescan"
    assert isinstance(board["schemaVersion"], int)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        assert g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "linescan_ready" in variables["instance"]["definition"]


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel's query parses (Prometheus' parser, via promtool, as a recording rule with
    Grafana's variables filled in)."""
    tool = promtool()
    rules = []
    for i, expr in enumerate(dashboard_exprs(variables=False)):
        filled = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        rules.append({"record": f"dashboard:query{i}", "expr": filled})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True,
                         timeout=60)  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr


def test_the_readme_shows_how_to_load_both() -> None:
    """The README names both files and how to load them."""
    text = README.read_text(encoding="utf-8")
    assert "deploy/prometheus-alerts.yml" in text
    assert "deploy/grafana-dashboard.json" in text
    assert "promtool check rules" in text
