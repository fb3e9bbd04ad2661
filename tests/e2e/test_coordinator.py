"""``ptmig migrate`` end to end: the lab guest with two teams (lan: preserve, wan: follow)
moves hosta -> hostb -> hosta under 1000 packets/s, ptmigd's reconciler repairs a degraded
domain, and a domain whose primaries an operator unplugged with libvirt (not ptmig) still
migrates.  The failure cases are the fault matrix (test_fault_matrix.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from migration_checks import (
    OTHER,
    active_slave,
    guest_mac,
    migrate_cli,
    phase_loss,
    pingers,
    there_and_back,
)

from host.workflow.model import Outcome
from lab import TEAM_MAC
from lab import coordinated as co
from lab.guest import DOMAIN_NAME
from lab.vmlab import VmLab

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def coordinated(lab: VmLab) -> VmLab:
    co.configure(lab)
    return lab


def test_migrate_there_and_back_keeps_teams_on_primaries(
    coordinated: VmLab, record_property: pytest.RecordProperty
) -> None:
    there_and_back(coordinated, record_property)


def scrape(url: str) -> dict[str, float]:
    """The samples of a Prometheus text page, by name with labels."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_ptmigd_counts_a_migration_it_runs_and_logs_its_events_with_fields(
    coordinated: VmLab, tmp_path: Path
) -> None:
    """A management layer's migration over gRPC: ptmigd's metrics move, and its log has one
    line per event naming the domain, the workflow and the phase."""
    from ptmig.v1 import coordinator_pb2 as pb
    from ptmig.v1 import coordinator_pb2_grpc as pb_grpc

    lab = coordinated
    src = lab.where()
    dest = OTHER[src]
    log_path = tmp_path / "ptmigd.log"
    with ptmigd(log_path, "--metrics-listen", "127.0.0.1:0") as (daemon, sock):
        deadline = time.monotonic() + 30
        # ptmigd logs its metrics address before it binds its socket: wait for both
        while (
            not (
                url := re.search(
                    r"metrics on (http://127\.0\.0\.1:\d+/metrics)", log_path.read_text()
                )
            )
            or not sock.exists()
        ):
            assert daemon.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        before = scrape(url[1])
        assert 'ptmig_migrations_total{outcome="done"}' not in before
        with grpc_channel(sock) as channel:
            events = list(
                pb_grpc.CoordinatorStub(channel).Migrate(
                    pb.MigrateRequest(
                        domain=DOMAIN_NAME,
                        source_uri=lab.hosts[src].uri,
                        destination_uri=lab.hosts[dest].uri,
                        unsafe=True,
                        peer_uri=lab.hosts[dest].tcp_uri,
                    ),
                    timeout=300,
                )
            )
            pools = pb_grpc.CoordinatorStub(channel).ListPools(
                pb.ListPoolsRequest(uri=lab.hosts[dest].uri), timeout=60
            )
        report = events[-1].report
        assert report.outcome == pb.OUTCOME_DONE, report
        after = scrape(url[1])
    assert lab.where() == dest
    assert after['ptmig_migrations_total{outcome="done"}'] == 1
    for phase in ("preflight", "switch", "unplug", "migrate", "bind"):
        assert after[f'ptmig_phase_seconds_count{{phase="{phase}"}}'] == 1, phase
    assert after['ptmig_team_standby_seconds_count{team="lan"}'] == 1
    assert after['ptmig_agent_call_seconds_count{rpc="GuestAgent/UseStandby"}'] >= 2
    assert after['ptmig_agent_call_seconds_count{rpc="GuestAgent/BindPrimary"}'] >= 2
    free = {p.name: p.free for p in pools.pools}
    assert (
        after[f'ptmig_pool_free_devices{{host="{lab.hosts[dest].uri}",pool="lab"}}'] == free["lab"]
    )
    # One logfmt line per event, with the workflow's fields.
    lines = log_path.read_text().splitlines()
    unplug_done = [ln for ln in lines if "phase=unplug" in ln and 'msg="done' in ln]
    assert len(unplug_done) == 1, lines[-40:]
    assert f"domain={DOMAIN_NAME} workflow={report.workflow_id} phase=unplug" in unplug_done[0]
    assert unplug_done[0].startswith("time=") and " level=info " in unplug_done[0]


@contextlib.contextmanager
def ptmigd(log_path: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """ptmigd on a private socket with the lab's journal, stopped with SIGTERM after."""
    sock_dir = Path(tempfile.mkdtemp(prefix="ptmigd-", dir="/run"))
    os.chmod(sock_dir, 0o700)
    sock = sock_dir / "ptmigd.sock"
    with log_path.open("w") as log:
        daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "host.daemon",
                "--socket",
                str(sock),
                "--journal",
                co.journal_path(),
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        yield daemon, sock
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
        sock.unlink(missing_ok=True)
        sock_dir.rmdir()


@contextlib.contextmanager
def grpc_channel(socket_path: Path) -> Iterator[Any]:
    import grpc

    with grpc.insecure_channel(f"unix:{socket_path}") as channel:
        yield channel


def test_empty_destination_pool_gives_degraded_then_the_reconciler_repairs(
    coordinated: VmLab, tmp_path: Path
) -> None:
    lab = coordinated
    if lab.where() != "hosta":
        migrate_cli(lab, "hosta")
    co.define_pools(lab, {"hostb": []})  # hostb's pool has no device left
    code, report = migrate_cli(lab, "hostb")
    assert lab.where() == "hostb"
    assert code == 3 and report["outcome"] == str(Outcome.DONE_DEGRADED), report
    assert set(report["teams"].values()) == {"standby"}
    lab.check_health()
    status = co.ptmig_json(lab, "hostb", "status", DOMAIN_NAME)
    assert {t["mode"] for t in status["teams"]} == {"degraded"}

    # devices come back to the pool; ptmigd's reconciler repairs the domain
    co.define_pools(lab, {"hostb": co.POOL_SLOTS["hostb"]})
    log_path = tmp_path / "ptmigd.log"
    with ptmigd(log_path, "--reconcile", lab.hosts["hostb"].uri, "--reconcile-interval", "2"):
        # Watch the metadata only (no agent channel): the reconciler owns the channel now.
        deadline = time.monotonic() + 120
        while True:
            teams = co.ptmig_json(lab, "hostb", "team-show", DOMAIN_NAME)["teams"]
            if all(t["primary"] for t in teams):
                break
            assert time.monotonic() < deadline, (teams, log_path.read_text())
            time.sleep(2)
    status = co.ptmig_json(lab, "hostb", "status", DOMAIN_NAME)
    assert {t["mode"] for t in status["teams"]} == {"primary"}, status
    lab.check_health()


# -- a domain that is not as ptmig recorded it ------------------------------------------


def detach_outside_ptmig(lab: VmLab) -> dict[str, str]:
    """``virsh detach-device-alias`` of each team's recorded primary: from the live domain
    only (virsh's default), ptmig's metadata untouched.  Returns team -> alias."""
    teams = co.ptmig_json(lab, lab.where(), "team-show", DOMAIN_NAME)["teams"]
    primaries = {t["name"]: t["primary"]["alias"] for t in teams if t["primary"]}
    assert set(primaries) == {"lan", "wan"}, teams
    for alias in primaries.values():
        lab.detach_nic(alias, config=False)
    return primaries


def migrate_measured(
    lab: VmLab, dest: str, name: str
) -> tuple[int, dict[str, Any], dict[str, dict[str, int]]]:
    ps = pingers(name)
    for p in ps:
        p.start()
    time.sleep(1)
    code, report = migrate_cli(lab, dest)
    time.sleep(1.5)
    losses = {team: phase_loss(p, report) for team, p in zip(("lan", "wan"), ps, strict=True)}
    print(f"{name}: {report['outcome']} {report['phases']}\nlost per phase: {losses}")
    return code, report, losses


def test_primaries_detached_outside_ptmig_migrate_done_on_destination_primaries(
    coordinated: VmLab, record_property: pytest.RecordProperty
) -> None:
    """Both MAC policies at once: lan (preserve) and wan (follow)."""
    lab = coordinated
    src = lab.where()
    dest = OTHER[src]
    primaries = detach_outside_ptmig(lab)
    # status and team-show say so, per team, in one line a person can act on
    status = co.ptmig_json(lab, src, "status", DOMAIN_NAME)
    by_team = {t["name"]: t for t in status["teams"]}
    shown = co.ptmig_json(lab, src, "team-show", DOMAIN_NAME)
    for team, alias in primaries.items():
        assert by_team[team]["mode"] == "degraded", status
        assert by_team[team]["case"] == "primary-absent", status
        assert by_team[team]["drift"].startswith(f"recorded primary {alias} is not plugged"), status
        assert (shown["cases"][team], shown["drift"][team]) == (
            "primary-absent",
            by_team[team]["drift"],
        )

    code, report, losses = migrate_measured(lab, dest, "drift-done")
    record_property("report_drift_done", report)
    record_property("lost_drift_done", losses)

    assert code == 0 and report["outcome"] == str(Outcome.DONE), report
    assert report["drift"] == {"lan": "primary-absent", "wan": "primary-absent"}
    assert report["teams"] == {"lan": "primary", "wan": "primary"}
    assert lab.where() == dest
    lab.check_health()
    lan_active, wan_active = active_slave(lab, "bond0"), active_slave(lab, "bond1")
    assert guest_mac(lab, lan_active) == TEAM_MAC
    assert guest_mac(lab, wan_active) in {mac for _, mac in co.POOL_SLOTS[dest]}
    assert guest_mac(lab, "bond1") == guest_mac(lab, wan_active)
    status = co.ptmig_json(lab, dest, "status", DOMAIN_NAME)
    assert {t["drift"] for t in status["teams"]} == {""}, status


def test_primaries_detached_outside_ptmig_to_an_empty_pool_is_done_degraded(
    coordinated: VmLab, record_property: pytest.RecordProperty
) -> None:
    lab = coordinated
    src = lab.where()
    dest = OTHER[src]
    detach_outside_ptmig(lab)
    co.define_pools(lab, {dest: []})
    try:
        code, report, losses = migrate_measured(lab, dest, "drift-degraded")
    finally:
        co.define_pools(lab, {dest: co.POOL_SLOTS[dest]})
    record_property("report_drift_degraded", report)
    record_property("lost_drift_degraded", losses)

    assert code == 3 and report["outcome"] == str(Outcome.DONE_DEGRADED), report
    assert report["drift"] == {"lan": "primary-absent", "wan": "primary-absent"}
    assert report["teams"] == {"lan": "standby", "wan": "standby"}
    assert lab.where() == dest
    lab.check_health()
    co.wait_for_teams_on_primary(lab)  # the pool has devices again
