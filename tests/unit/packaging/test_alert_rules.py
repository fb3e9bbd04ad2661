"""The Prometheus alerting rules and the Grafana dashboard the host package ships
(packaging/host/monitoring): promtool checks the rules and runs their tests on synthetic
series (ptmig-alerts.test.yml), and every metric they name is one ptmigd exports.

promtool comes from Debian's prometheus package (scripts/bootstrap.sh unpacks it into the
cache and puts it on PATH).  In CI
(CI=true) a missing promtool fails these tests; elsewhere they are skipped with a reason.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from package_tools import PACKAGING, REPO, run

MONITORING = PACKAGING / "host" / "monitoring"
RULES = MONITORING / "ptmig-alerts.yml"
DASHBOARD = MONITORING / "ptmig-dashboard.json"
RULES_TEST = Path(__file__).with_name("ptmig-alerts.test.yml")
GUIDE = REPO / "docs" / "operator-guide.md"
METRIC = re.compile(r"\bptmig_[a-z0-9_]+\b")
#: Grafana's variables, as a query would read them once Grafana filled them in.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        message = (
            "promtool not on PATH (scripts/bootstrap.sh unpacks it from Debian's prometheus .deb)"
        )
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def alert_names(text: str) -> list[str]:
    return re.findall(r"^\s*-?\s*alert:\s*(\S+)\s*$", text, re.MULTILINE)


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert queries
    return queries


def test_promtool_checks_the_shipped_rules(promtool: str) -> None:
    result = run(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_names(RULES.read_text()))} rules found" in result.stdout


def test_the_rules_fire_after_their_time_and_not_before_nor_once_resolved(
    promtool: str,
) -> None:
    result = run(promtool, "test", "rules", RULES_TEST.name, cwd=RULES_TEST.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_both_ways_and_documented() -> None:
    alerts = alert_names(RULES.read_text())
    assert len(alerts) == len(set(alerts)) >= 5
    tests = RULES_TEST.read_text()
    guide = GUIDE.read_text()
    for alert in alerts:
        cases = re.findall(rf"alertname: {alert}\n\s+exp_alerts:(\s*\[\])?", tests, re.MULTILINE)
        assert any(empty for empty in cases), f"{alert}: no case where it must not fire"
        assert any(not empty for empty in cases), f"{alert}: no case where it fires"
        assert f"`{alert}`" in guide, f"{alert} is not in the operator guide"


def exported_metric_names() -> set[str]:
    """The sample names ptmigd's real registry serves once every observer call was made."""
    prometheus_client = pytest.importorskip("prometheus_client")
    from host.metrics import PrometheusObserver
    from host.workflow.model import MigrationReport, Outcome, PhaseTiming
    from host.workflow.observer import HostPass, PoolUse

    observer = PrometheusObserver()
    report = MigrationReport(
        "wf1",
        "web1",
        "qemu:///a",
        "qemu:///b",
        Outcome.DONE,
        phases=[PhaseTiming("switch", 0.5, "", 100.0), PhaseTiming("bind", 1.0, "", 101.0)],
        teams={"lan": "primary"},
    )
    observer.migration_finished(report)
    observer.repair_finished("web1", "repaired")
    observer.degraded_teams("qemu:///a", 1)
    observer.agent_call("GetState", 0.01, "UNAVAILABLE")
    observer.pool_free("qemu:///a", "lan", 1, 4)
    observer.host_passed("qemu:///a", HostPass({"web1": True}, (PoolUse("lan", 4, 1, 2),)))
    text = prometheus_client.generate_latest(observer.registry).decode()
    return {
        m[0]
        for line in text.splitlines()
        if line and not line.startswith("#")
        for m in [re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line)]
        if m
    }


def test_every_metric_the_rules_and_the_dashboard_name_is_exported() -> None:
    exported = exported_metric_names()
    assert "ptmig_degraded_teams" in exported  # the scrape did read the registry
    rules = set(METRIC.findall(RULES.read_text()))
    dashboard = {name for query in dashboard_queries() for name in METRIC.findall(query)}
    assert len(rules) >= 5 and len(dashboard) >= 10
    assert rules - exported == set()
    assert dashboard - exported == set()


def test_every_dashboard_query_is_promql(promtool: str, tmp_path: Path) -> None:
    """Each panel's query, its Grafana variables filled in, parses as PromQL (as a
    recording rule promtool checks)."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, query in enumerate(dashboard_queries()):
        for variable, value in GRAFANA_VARIABLES.items():
            query = query.replace(variable, value)
        assert "$" not in query, query
        lines += [
            f"      - record: ptmig_dashboard_query_{n}",
            f"        expr: {json.dumps(query)}",
        ]
    rules = tmp_path / "dashboard.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = run(promtool, "check", "rules", rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_dashboard_reads_a_chosen_prometheus() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
