"""The chart's alerts and dashboard, checked with Prometheus' own promtool (built from the Go module proxy by
testbed/build.sh, like helm).

The PrometheusRule is rendered with metrics.prometheusRule.enabled=true, its rules are written out as a
rules file, and promtool checks them (`check rules`) and runs their unit tests (`test rules`,
tests/alerts_test.yaml): each alert fires where it should and stays quiet where it should not. A rule
that never fires must fail its unit test, so every alert's firing case is proven to be checked. The
metric names in the alerts and the dashboard are those the real collector exports, and each alert's
runbook is a section of the README.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from idm_backup_operator.metrics import BackupMetrics, SlotMetrics
from idm_backup_operator.slots import BackupSlots
from testbed import stack
from testbed.deploy import REPO
from tests.helpers import CHART, of_kind, render
from tests.test_docs import anchors

UNIT_TESTS = REPO / "tests" / "alerts_test.yaml"
DASHBOARD = CHART / "dashboards" / "idm-backup-operator.json"
RELEASE_NAMESPACE = "idm-backup-system"  # the namespace alerts_test.yaml expects (IdmBackupOperatorDown)
ALERTS = {
    "IdmBackupFailed": "warning",
    "IdmBackupTooOld": "critical",
    "IdmBackupNeverSucceeded": "critical",
    "IdmBackupRepeatedFailures": "warning",
    "IdmBackupServicesDown": "critical",
    "IdmBackupStorageUnavailable": "warning",
    "IdmBackupDrillFailed": "warning",
    "IdmBackupQueued": "info",
    "IdmBackupOperatorDown": "critical",
}
METRIC = re.compile(r"\bidm_backup_[a-z_]+\b")


@pytest.fixture(scope="session")
def promtool() -> Path:
    """promtool, built by testbed/build.sh (a no-op once cached)."""
    bin_dir = stack.build("promtool")
    path = Path((bin_dir.parent / "promtool.path").read_text().strip()) / "promtool"
    assert path.is_file(), path
    return path


def rule_groups(helm: Callable[..., str], *args: str) -> dict[str, Any]:
    """The rendered PrometheusRule's spec: a Prometheus rules file."""
    docs = render(helm, "--set", "metrics.prometheusRule.enabled=true", *args, namespace=RELEASE_NAMESPACE)
    (rule,) = of_kind(docs, "PrometheusRule")
    spec: dict[str, Any] = rule["spec"]
    return spec


def alerts_of(groups: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in groups["groups"] for r in g["rules"] if "alert" in r}


def run_promtool(promtool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(promtool), *args], capture_output=True, text=True, timeout=120)


def unit_test_dir(tmp_path: Path, groups: dict[str, Any]) -> Path:
    """rules.yaml next to a copy of the unit tests, which name it relative to themselves."""
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups, sort_keys=False))
    shutil.copy(UNIT_TESTS, tmp_path / "alerts_test.yaml")
    return tmp_path / "alerts_test.yaml"


def exported_metric_names() -> set[str]:
    """Every series name the operator's collectors export, from the real exposition."""
    state = BackupMetrics()
    state.registry.register(SlotMetrics(BackupSlots(2)))
    drilled = {"name": "nightly-drill-1", "restoreSeconds": 42.5, "entries": 120}
    schedule = {
        "metadata": {"uid": "s1", "name": "nightly", "namespace": "identity"},
        "spec": {"drill": {"schedule": "0 6 * * 0"}},
        "status": {
            "nextScheduleTime": "2026-11-27T02:00:00Z",
            "lastDrill": {**drilled, "time": "2026-11-22T06:10:00Z", "result": "Failed"},
            "lastSuccessfulDrill": {**drilled, "time": "2026-11-15T06:10:00Z", "result": "Succeeded"},
            "lastFailedDrill": {**drilled, "time": "2026-11-22T06:10:00Z", "result": "Failed"},
            "consecutiveDrillFailures": 1,
        },
    }
    backup = {
        "metadata": {
            "uid": "b1",
            "name": "nightly-1",
            "namespace": "identity",
            "labels": {"idm-backup.io/schedule": "nightly"},
            "ownerReferences": [{"kind": "IdmBackupSchedule", "uid": "s1"}],
        },
        "status": {"phase": "Running"},
    }
    failed = {"metadata": {"uid": "b2", "name": "by-hand", "namespace": "identity"}, "status": {}}
    state.seed([], [schedule])
    state.observe_backup(backup)
    state.observe_backup(failed)
    finished = {"phase": "Succeeded", "completionTime": "2026-11-26T02:10:00Z", "durationSeconds": 600}
    state.observe_backup({**backup, "status": {**finished, "archive": {"sizeBytes": 1024}}})
    state.observe_backup(
        {
            **failed,
            "status": {
                "phase": "Failed",
                "completionTime": "2026-11-26T03:00:00Z",
                "conditions": [{"type": "ServicesRunning", "status": "False", "reason": "ServicesDown"}],
            },
        }
    )
    state.observe_storage("s1", ("nightly", "identity"), "s3://idm-backups/prod", available=True, checked=1e9)
    names = set()
    for line in state.exposition().decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


# --- the rules -----------------------------------------------------------------------------------------


def test_promtool_accepts_the_rendered_rules(
    helm: Callable[..., str], promtool: Path, tmp_path: Path
) -> None:
    groups = rule_groups(helm)
    assert set(alerts_of(groups)) == set(ALERTS)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups, sort_keys=False))
    result = run_promtool(
        promtool, "check", "rules", "--lint=all", "--lint-fatal", str(tmp_path / "rules.yaml")
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout, result.stdout


def test_promtool_runs_the_alerts_unit_tests(
    helm: Callable[..., str], promtool: Path, tmp_path: Path
) -> None:
    result = run_promtool(promtool, "test", "rules", str(unit_test_dir(tmp_path, rule_groups(helm))))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout, result.stdout


def test_every_alert_has_a_case_where_it_fires_and_one_where_it_does_not(helm: Callable[..., str]) -> None:
    cases: dict[str, dict[str, int]] = {name: {"fires": 0, "quiet": 0} for name in ALERTS}
    for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            cases[case["alertname"]]["fires" if case["exp_alerts"] else "quiet"] += 1
    assert all(c["fires"] and c["quiet"] for c in cases.values()), cases
    # The unit tests expect the rendered severity and runbook of each alert.
    rendered = alerts_of(rule_groups(helm))
    for group in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for case in group.get("alert_rule_test", []):
            alert = rendered[case["alertname"]]
            for expected in case["exp_alerts"]:
                assert expected["exp_labels"]["severity"] == alert["labels"]["severity"]
                assert expected["exp_annotations"]["runbook_url"] == alert["annotations"]["runbook_url"]


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_an_alert_that_never_fires_fails_its_unit_test(
    helm: Callable[..., str], promtool: Path, tmp_path: Path, alert: str
) -> None:
    groups = rule_groups(helm)
    (rule,) = [r for g in groups["groups"] for r in g["rules"] if r.get("alert") == alert]
    rule["expr"] = "vector(1) == 0"
    result = run_promtool(promtool, "test", "rules", str(unit_test_dir(tmp_path, groups)))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    failed = re.findall(r"alertname: (\w+),", output)
    assert failed and set(failed) == {alert}, output


def test_the_rules_follow_the_values(helm: Callable[..., str], promtool: Path, tmp_path: Path) -> None:
    groups = rule_groups(
        helm,
        "--set", "metrics.prometheusRule.backupMaxAgeHours=170",
        "--set", "metrics.prometheusRule.failureThreshold=5",
        "--set", "metrics.prometheusRule.failureWindow=7d",
        "--set", "metrics.prometheusRule.queuedFor=2h",
        "--set", "metrics.prometheusRule.storageUnavailableFor=30m",
        "--set", "metrics.prometheusRule.operatorDownFor=5m",
        "--set", "metrics.prometheusRule.additionalLabels.team=identity",
        "--set", "metrics.prometheusRule.runbookBaseURL=https://wiki.example.com/idm/",
        "--set", "metrics.prometheusRule.disabled={IdmBackupQueued}",
    )  # fmt: skip
    alerts = alerts_of(groups)
    assert set(alerts) == set(ALERTS) - {"IdmBackupQueued"}
    assert alerts["IdmBackupTooOld"]["expr"].endswith("> 170 * 3600")
    assert "offset 170h" in alerts["IdmBackupNeverSucceeded"]["expr"]
    assert "[7d]" in alerts["IdmBackupRepeatedFailures"]["expr"]
    assert alerts["IdmBackupRepeatedFailures"]["expr"].endswith(">= 5")
    assert alerts["IdmBackupOperatorDown"]["for"] == "5m"
    assert alerts["IdmBackupStorageUnavailable"]["for"] == "30m"
    assert "failed for 30m" in alerts["IdmBackupStorageUnavailable"]["annotations"]["description"]
    assert (
        alerts["IdmBackupOperatorDown"]["expr"] == 'absent(idm_backup_slots{namespace="idm-backup-system"})'
    )
    for name, alert in alerts.items():
        assert alert["labels"] == {"severity": ALERTS[name], "team": "identity"}
        assert alert["annotations"]["runbook_url"] == f"https://wiki.example.com/idm#alert-{name.lower()}"
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups, sort_keys=False))
    result = run_promtool(promtool, "check", "rules", str(tmp_path / "rules.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_and_dashboard_use_only_series_the_operator_exports(helm: Callable[..., str]) -> None:
    exported = exported_metric_names()
    assert {
        "idm_backup_last_successful_timestamp_seconds", "idm_backup_last_failure_timestamp_seconds",
        "idm_backup_last_status", "idm_backup_attempt_total", "idm_backup_failure_total",
        "idm_backup_duration_seconds_bucket", "idm_backup_schedule_next_run_timestamp_seconds",
        "idm_backup_storage_available", "idm_backup_storage_last_check_timestamp_seconds",
        "idm_backup_slots", "idm_backup_queued",
        "idm_backup_last_services_running", "idm_backup_last_services_check_timestamp_seconds",
    } <= exported  # fmt: skip
    used_by_alerts = {m for a in alerts_of(rule_groups(helm)).values() for m in METRIC.findall(a["expr"])}
    assert used_by_alerts and used_by_alerts <= exported, used_by_alerts - exported
    used_by_dashboard = set(METRIC.findall(DASHBOARD.read_text()))
    assert len(used_by_dashboard) >= 10 and used_by_dashboard <= exported, used_by_dashboard - exported


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of the dashboard, its variables and panels."""
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [
        (f"variable {v['name']}", v["definition"])
        for v in dashboard["templating"]["list"]
        if "definition" in v
    ]
    for panel in dashboard["panels"]:
        queries += [(panel["title"], target["expr"]) for target in panel.get("targets", [])]
    return queries


def test_the_dashboards_queries_are_valid_promql(promtool: Path, tmp_path: Path) -> None:
    """promtool parses each query as a recording rule, once Grafana's variables are substituted."""
    rules = []
    for index, (title, query) in enumerate(dashboard_queries()):
        if query.startswith("label_values("):  # Grafana's function: its argument is the query
            query = query.removeprefix("label_values(").rsplit(",", 1)[0]
        expr = query.replace("$namespace", ".*").replace("$schedule", ".*")
        assert "$" not in expr, (title, query)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    assert len(rules) >= 20
    (tmp_path / "dashboard-rules.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    result = run_promtool(promtool, "check", "rules", str(tmp_path / "dashboard-rules.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


# --- runbooks ------------------------------------------------------------------------------------------


def test_each_alert_links_its_runbook_in_the_readme_at_the_charts_home(helm: Callable[..., str]) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    readme_anchors = anchors(REPO / "README.md")
    for name, alert in alerts_of(rule_groups(helm)).items():
        url = alert["annotations"]["runbook_url"]
        base, _, fragment = url.partition("#")
        assert base == chart["home"], url
        assert fragment == f"alert-{name.lower()}" and fragment in readme_anchors, url
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    # The README's section names each alert, and the chart's README links to it.
    section = (REPO / "README.md").read_text().split("\n## Alerts and runbooks\n", 1)[1].split("\n## ", 1)[0]
    assert [m for m in re.findall(r"^### Alert: (\w+)$", section, flags=re.MULTILINE)] == list(ALERTS)
    assert f"{chart['home']}#alerts-and-runbooks" in (CHART / "README.md").read_text()
