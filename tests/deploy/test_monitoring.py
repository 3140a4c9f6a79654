"""The monitoring that ships with the manifests: the alerts, their rule tests and the dashboard.

- The PrometheusRule's rules pass `promtool check rules`, and `promtool test rules` runs
  tests/deploy/prometheusrule.test.yaml, which has, for every alert, series that fire it and
  series that do not. promtool is required: these tests fail without it (`.ci/promtool`
  installs it).
- Every alert carries a severity, a summary, a description and the README's runbook.
- k8s/base/dashboard.yaml is what k8s/dashboard.py writes, and Grafana's sidecar finds it.
- Every PromQL expression, in the alerts and in the dashboard, names only metrics that a worker
  (in fleet mode, so with the Redis ones) exports: read from its own registry, not from a list.
"""

from __future__ import annotations

import json
import re
import runpy
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.fakes import FakeTokens
from tests.support.harness import isolated_settings
from worker.app import Worker

ROOT = Path(__file__).resolve().parents[2]
RULE = ROOT / "k8s" / "base" / "prometheusrule.yaml"
DASHBOARD = ROOT / "k8s" / "base" / "dashboard.yaml"
RULE_TESTS = Path(__file__).with_name("prometheusrule.test.yaml")
#: The name the rule tests' `rule_files` give the rules.
RULE_FILE = "invite-worker.rules.yaml"
RUNBOOK_URL = "https://github.com/contact-center/invite-worker/blob/main/README.md#runbook"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: run .ci/promtool (Debian's prometheus package)")
    return path


def run_promtool(*args: str | Path, cwd: Path) -> str:
    result = subprocess.run(  # noqa: S603 - promtool on this repository's files
        [promtool(), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULE.read_text())["spec"]["groups"]
    return groups


def alerts() -> list[dict[str, Any]]:
    return [rule for group in rule_groups() for rule in group["rules"] if "alert" in rule]


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """The PrometheusRule's spec as a plain rule file, beside a copy of the rule tests."""
    (tmp_path / RULE_FILE).write_text(yaml.safe_dump({"groups": rule_groups()}))
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    return tmp_path


def test_the_rules_pass_promtool_check(rules_dir: Path) -> None:
    output = run_promtool("check", "rules", RULE_FILE, cwd=rules_dir)
    assert f"SUCCESS: {len(alerts())} rules found" in output


def test_every_alert_fires_on_its_series_and_not_on_the_others(rules_dir: Path) -> None:
    """promtool test rules passes, and every alert has an expected firing in it."""
    output = run_promtool("test", "rules", RULE_TESTS.name, cwd=rules_dir)
    print(output)
    assert "SUCCESS" in output
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == [RULE_FILE]
    fired = {
        case["alertname"]
        for test in tests["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == {alert["alert"] for alert in alerts()}


def test_every_alert_says_how_bad_what_and_where_the_runbook_is() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "\n### Runbook\n" in readme
    for alert in alerts():
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        annotations = alert["annotations"]
        assert {"summary", "description", "runbook_url"} <= set(annotations), alert["alert"]
        assert annotations["runbook_url"] == RUNBOOK_URL, alert["alert"]


# --- The dashboard ----------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    configmap = yaml.safe_load(DASHBOARD.read_text())
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (body,) = configmap["data"].values()
    board: dict[str, Any] = json.loads(body)
    return board


def test_the_dashboard_is_what_its_generator_writes() -> None:
    generator = runpy.run_path(str(ROOT / "k8s" / "dashboard.py"))
    assert DASHBOARD.read_text() == generator["configmap"](), "run `python k8s/dashboard.py`"


def test_the_dashboard_shows_what_an_operator_looks_for() -> None:
    board = dashboard()
    exprs = " ".join(target["expr"] for target in dashboard_targets(board))
    for needle in (
        "invite_outcomes_total",
        "histogram_quantile(0.99, sum by (le) (rate(invite_graph_request_duration_seconds_bucket",
        "sum by (tenant) (rate(invite_graph_throttled_total",
        "invite_graph_retry_after_seconds_total",
        "invite_rate_limiter_wait_seconds_bucket",
        "invite_graph_requests_in_flight",
        "invite_commands_in_progress",
        "invite_dead_lettered_total",
    ):
        assert needle in exprs, needle
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))


def dashboard_targets(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield from panel["targets"]


# --- Metric names in PromQL -------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
#: Grafana's template query: its second argument is a label.
_LABEL_VALUES = re.compile(r"\blabel_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$:])[A-Za-z_:][\w:]*(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels, keywords aside)."""
    expr = _STRING.sub('""', expr)
    expr = _LABEL_VALUES.sub(r"\1", expr)
    for pattern in (_MATCHERS, _RANGE, _GROUPING):
        expr = pattern.sub(" ", expr)
    return {name for name in _IDENTIFIER.findall(expr) if name.lower() not in _KEYWORDS}


def exported_names() -> set[str]:
    """What a worker in fleet mode exposes: every family of its registry, as sample names."""
    # Building a Worker connects to nothing; its gauges are registered by then.
    worker = Worker(
        isolated_settings({"REDIS_URL": "redis://127.0.0.1:6379/0"}), tokens=FakeTokens()
    )
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    suffixes |= {"info": ["_info"], "summary": ["", "_count", "_sum"]}
    return {
        family.name + suffix
        for family in worker.metrics.registry.collect()
        for suffix in suffixes.get(family.type, [""])
    }


def test_metric_names_reads_promql() -> None:
    expr = (
        'sum by (le, tenant) (rate(a_bucket{x="{b}",y=~"c|d"}[5m] offset 1m)) > 1e3'
        " and on (namespace) min without (pod) (c:recorded) == bool 0"
        ' or label_values(e_total, namespace) / f{namespace="$namespace"}'
    )
    assert metric_names(expr) == {"a_bucket", "c:recorded", "e_total", "f"}


def test_every_query_names_only_metrics_the_worker_exports() -> None:
    exported = exported_names()
    assert {"invite_redis_available", "invite_ready", "invite_outcomes_total"} <= exported
    board = dashboard()
    queries = {f"alert {a['alert']}": a["expr"] for a in alerts()}
    queries |= {f"panel {t['expr']}": t["expr"] for t in dashboard_targets(board)}
    queries |= {f"variable {v['name']}": v["query"] for v in board["templating"]["list"][1:]}
    for where, expr in queries.items():
        names = metric_names(expr)
        assert names, where
        assert names <= exported, f"{where}: not exported: {names - exported}"


def test_histogram_panels_show_exemplars_that_link_to_traces() -> None:
    targets = dashboard_targets(dashboard())
    histograms = [target for target in targets if "_bucket{" in target["expr"]]
    assert histograms, "the dashboard has latency quantiles"
    assert all(target["exemplar"] is True for target in histograms)
    assert not any(target["exemplar"] for target in targets if target not in histograms)
