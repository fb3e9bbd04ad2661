"""ptmigd's Prometheus metrics: what each observer call counts, and the HTTP endpoint."""

from __future__ import annotations

import urllib.request

import pytest

from host.metrics import (
    ALERTED_OUTCOMES,
    MetricsError,
    PrometheusObserver,
    parse_listen,
    serve,
    standby_seconds,
)
from host.workflow.model import MigrationReport, Outcome, PhaseTiming
from host.workflow.observer import HostPass, PoolUse

pytest.importorskip("prometheus_client")


def report(outcome: Outcome = Outcome.DONE) -> MigrationReport:
    return MigrationReport(
        "wf1",
        "web1",
        "qemu:///a",
        "qemu:///b",
        outcome,
        phases=[
            PhaseTiming("preflight", 0.5, "", 100.0),
            PhaseTiming("switch", 0.25, "", 100.5),
            PhaseTiming("unplug", 0.5, "", 100.75),
            PhaseTiming("migrate", 3.0, "", 101.25),
            PhaseTiming("bind", 1.5, "", 104.25),
        ],
        teams={"lan": "primary", "wan": "standby"},
    )


def sample(observer: PrometheusObserver, name: str, **labels: str) -> float | None:
    value = observer.registry.get_sample_value(name, labels)
    return None if value is None else float(value)


def test_a_migration_counts_its_outcome_phases_and_standby_time() -> None:
    observer = PrometheusObserver()
    observer.migration_finished(report())
    observer.migration_finished(report(Outcome.ROLLED_BACK))
    assert sample(observer, "ptmig_migrations_total", outcome="done") == 1
    assert sample(observer, "ptmig_migrations_total", outcome="rolled-back") == 1
    assert sample(observer, "ptmig_phase_seconds_count", phase="migrate") == 2
    assert sample(observer, "ptmig_phase_seconds_sum", phase="migrate") == 6.0
    # lan: from the switch's end (100.75) to the bind's end (105.75); wan stayed on standby.
    assert sample(observer, "ptmig_team_standby_seconds_sum", team="lan") == 10.0
    assert sample(observer, "ptmig_team_standby_seconds_count", team="wan") is None


def test_standby_time_needs_both_a_switch_and_a_bind() -> None:
    no_bind = report()
    no_bind.phases = no_bind.phases[:3]
    assert list(standby_seconds(no_bind)) == []
    assert list(standby_seconds(report())) == [("lan", 5.0)]


def test_repairs_degraded_teams_agent_calls_and_pools() -> None:
    observer = PrometheusObserver()
    observer.repair_finished("web1", "repaired")
    observer.degraded_teams("qemu:///a", 3)
    observer.degraded_teams("qemu:///a", 1)  # a gauge: the last pass counts
    observer.agent_call("UseStandby", 0.02, "")
    observer.agent_call("UseStandby", 1.5, "DEADLINE_EXCEEDED")
    observer.pool_free("qemu:///a", "lan-vfs", 2, 7)
    assert sample(observer, "ptmig_repairs_total", outcome="repaired") == 1
    assert sample(observer, "ptmig_degraded_teams", host="qemu:///a") == 1
    assert sample(observer, "ptmig_agent_call_seconds_count", rpc="UseStandby") == 2
    assert (
        sample(
            observer, "ptmig_agent_call_errors_total", rpc="UseStandby", code="DEADLINE_EXCEEDED"
        )
        == 1
    )
    assert sample(observer, "ptmig_pool_free_devices", host="qemu:///a", pool="lan-vfs") == 2
    assert sample(observer, "ptmig_pool_devices", host="qemu:///a", pool="lan-vfs") == 7


def test_the_outcomes_alerts_count_are_exported_from_zero() -> None:
    """A counter's first failure must be an increase a rule can see, not a new series at 1."""
    observer = PrometheusObserver()
    for outcome in ALERTED_OUTCOMES:
        assert sample(observer, "ptmig_migrations_total", outcome=str(outcome)) == 0
    observer.migration_finished(report(Outcome.FAILED))
    assert sample(observer, "ptmig_migrations_total", outcome="failed") == 1


def test_a_reconciler_pass_replaces_its_hosts_view() -> None:
    observer = PrometheusObserver()
    observer.host_passed(
        "qemu:///a",
        HostPass(
            {"web1": True, "db1": False}, (PoolUse("lan", 4, 0, 4), PoolUse("wan", 2, None, 1))
        ),
    )
    observer.host_passed("qemu:///b", HostPass({"web2": True}))
    assert sample(observer, "ptmig_agent_up", host="qemu:///a", domain="web1") == 1
    assert sample(observer, "ptmig_agent_up", host="qemu:///a", domain="db1") == 0
    assert sample(observer, "ptmig_pool_free_devices", host="qemu:///a", pool="lan") == 0
    assert sample(observer, "ptmig_pool_devices", host="qemu:///a", pool="lan") == 4
    assert sample(observer, "ptmig_pool_teams", host="qemu:///a", pool="lan") == 4
    # a pool whose free devices cannot be counted has no free sample (not a false 0)
    assert sample(observer, "ptmig_pool_free_devices", host="qemu:///a", pool="wan") is None
    assert sample(observer, "ptmig_pool_teams", host="qemu:///a", pool="wan") == 1
    passed = sample(observer, "ptmig_reconcile_last_pass_timestamp_seconds", host="qemu:///a")
    assert passed is not None and passed > 1.7e9

    # db1 left host a, and pool wan with it; host b is untouched
    observer.host_passed("qemu:///a", HostPass({"web1": True}, (PoolUse("lan", 4, 1, 3),)))
    assert sample(observer, "ptmig_agent_up", host="qemu:///a", domain="db1") is None
    assert sample(observer, "ptmig_pool_teams", host="qemu:///a", pool="wan") is None
    assert sample(observer, "ptmig_pool_free_devices", host="qemu:///a", pool="lan") == 1
    assert sample(observer, "ptmig_agent_up", host="qemu:///b", domain="web2") == 1


def test_a_pool_listing_updates_counts_and_keeps_the_teams_a_pass_counted() -> None:
    observer = PrometheusObserver()
    observer.pool_free("qemu:///a", "lan", 2, 4)  # before any pass: no teams known
    assert sample(observer, "ptmig_pool_free_devices", host="qemu:///a", pool="lan") == 2
    assert sample(observer, "ptmig_pool_teams", host="qemu:///a", pool="lan") is None
    assert sample(observer, "ptmig_reconcile_last_pass_timestamp_seconds", host="qemu:///a") is None
    observer.host_passed("qemu:///a", HostPass({}, (PoolUse("lan", 4, 2, 2),)))
    observer.pool_free("qemu:///a", "lan", 0, 4)
    assert sample(observer, "ptmig_pool_free_devices", host="qemu:///a", pool="lan") == 0
    assert sample(observer, "ptmig_pool_teams", host="qemu:///a", pool="lan") == 2


def test_the_endpoint_serves_the_registry_and_stops() -> None:
    observer = PrometheusObserver()
    observer.migration_finished(report())
    server = serve(observer, "127.0.0.1:0")
    host, port = server.address
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
    finally:
        server.stop()
    assert 'ptmig_migrations_total{outcome="done"} 1.0' in text
    assert not server.thread.is_alive()


@pytest.mark.parametrize("text", ["9464", ":9464", "host:", "host:x", "host:70000", "[::1]"])
def test_bad_addresses_are_one_line_errors(text: str) -> None:
    with pytest.raises(MetricsError, match="is not HOST:PORT"):
        parse_listen(text)


def test_good_addresses() -> None:
    assert parse_listen("0.0.0.0:9464") == ("0.0.0.0", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)


def test_a_taken_port_is_a_clear_error() -> None:
    observer = PrometheusObserver()
    server = serve(observer, "127.0.0.1:0")
    try:
        with pytest.raises(MetricsError, match="cannot listen on"):
            serve(observer, f"127.0.0.1:{server.address[1]}")
    finally:
        server.stop()
