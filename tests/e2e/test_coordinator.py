"""``ptmig migrate`` end to end: the lab guest with two teams (lan: preserve, wan: follow)
moves hosta -> hostb -> hosta under 1000 packets/s, ptmigd's reconciler repairs a degraded
domain, and a domain whose primaries an operator unplugged with libvirt (not ptmig) still
migrates.  The failure cases are the fault matrix (test_fault_matrix.py).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from migration_checks import OTHER, active_slave, guest_mac, measured_move, there_and_back
from ptmig.v1 import coordinator_pb2 as pb
from ptmig.v1 import coordinator_pb2_grpc as pb_grpc

from host.daemon import ListenConfig, serve
from host.hypervisor import Hypervisor
from host.migration_options import MigrationStats
from host.workflow.coordinator import Coordinator
from host.workflow.journal import Journal
from host.workflow.model import Outcome, TeamMode, plain
from lab import TEAM_MAC, pki
from lab import coordinated as co
from lab.guest import DOMAIN_NAME
from lab.vmlab import DATA_DISK, VmLab

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def coordinated(lab: VmLab) -> VmLab:
    co.configure(lab)
    return lab


def test_migrate_there_and_back_keeps_teams_on_primaries(
    coordinated: VmLab, record_property: pytest.RecordProperty
) -> None:
    there_and_back(coordinated, record_property)


# -- the migration options (--tls, --copy-storage-all, --bandwidth, ...) ------------------


PRIMARIES = {"lan": TeamMode.PRIMARY, "wan": TeamMode.PRIMARY}


def move_with(lab: VmLab, dest: str, *options: str) -> MigrationStats:
    """``ptmig migrate`` with *options*: done, both teams on primaries, the guest healthy;
    returns the report's migration statistics."""
    moved = co.migrate(lab, dest, *options)
    report = moved.report
    print(f"{' '.join(options)} -> {dest}: {report.phases}")
    assert moved.exit_code == 0 and report.outcome is Outcome.DONE, report
    assert report.teams == PRIMARIES
    assert lab.where() == dest
    lab.check_health()
    assert report.migration is not None, report
    return report.migration


def test_tls_migrates_there_and_back_and_a_destination_trusting_another_ca_refuses(
    coordinated: VmLab, record_property: pytest.RecordProperty
) -> None:
    """What proves TLS was used: the destination trusting a CA that did not sign the
    source's client certificate makes ``--tls`` fail (rolled back, the VM where it was),
    the lab's own CA makes it pass; QEMU had the TLS credentials set during the job."""
    lab = coordinated
    src = lab.where()
    dest = OTHER[src]
    etc = lab.hosts[dest].path_inside("/etc/libvirt")
    pki.trust(etc, pki.make_ca("foreign"))
    try:
        moved = co.migrate(lab, dest, "--tls")
    finally:
        pki.trust(etc, pki.lab_ca())
    report = moved.report
    assert moved.exit_code == 4 and report.outcome is Outcome.ROLLED_BACK, report
    # the handshake is what failed: the source's error or the destination's QEMU says so
    qemu_log = lab.hosts[dest].qemu_log(DOMAIN_NAME).read_text(errors="replace")[-4000:]
    assert re.search(r"tls|certificate|x509", report.error + qemu_log, re.I), (
        report.error,
        qemu_log,
    )
    assert report.teams == PRIMARIES
    assert lab.where() == src
    for there in (dest, src):
        migration = move_with(lab, there, "--tls")
        record_property(f"tls_{there}", plain(migration))
        assert migration.tls is True
        assert migration.tls_creds, migration  # QEMU's tls-creds object, during the job


def guest_block(lab: VmLab, command: str) -> str:
    return lab.exec(command).check().strip()


def read_mark(lab: VmLab) -> str:
    """The first line of the guest's data disk, read past the page cache."""
    return guest_block(lab, "dd if=/dev/vdb bs=4096 count=1 iflag=direct 2>/dev/null | head -n1")


def write_mark(lab: VmLab, mark: str) -> None:
    guest_block(
        lab,
        f"printf '%s\\n' {mark} | dd of=/dev/vdb bs=4096 count=1 conv=sync,fsync "
        "oflag=direct 2>/dev/null; echo written",
    )


def mark_in_file(path: Path, tmp: Path) -> str:
    """The first line of a host's disk file, as qemu-img reads it (shared, read-only)."""
    raw = tmp / f"{path.parent.parent.parent.name}.raw"
    subprocess.run(
        ["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", str(path), str(raw)], check=True
    )
    with raw.open("rb") as f:
        return f.read(4096).split(b"\n")[0].decode(errors="replace")


def test_copy_storage_all_moves_a_local_disk_there_and_back(
    coordinated: VmLab, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    """A disk local to each host (same path, each host's own file): what the guest wrote
    on one host is what it reads on the other, and the destination's own file has it."""
    lab = coordinated
    src = lab.where()
    dest = OTHER[src]
    files = {host: lab.make_local_disk(host) for host in (src, dest)}
    assert files[src] != files[dest]
    lab.attach_disk(DATA_DISK, "vdb", "ua-data")
    try:
        deadline = time.monotonic() + 30
        while lab.exec("test -b /dev/vdb").status != 0:
            assert time.monotonic() < deadline, "no /dev/vdb in the guest"
            time.sleep(0.5)
        write_mark(lab, f"mark-on-{src}")
        for there in (dest, src):
            before = lab.where()
            migration = move_with(lab, there, "--copy-storage-all", "--migrate-disks", "vdb")
            record_property(f"copy_storage_{there}", plain(migration))
            assert migration.copy_storage == "all"
            assert migration.migrate_disks == ("vdb",)
            assert (migration.disk_total or 0) >= 64 << 20, migration
            assert read_mark(lab) == f"mark-on-{before}"
            assert mark_in_file(files[there], tmp_path) == f"mark-on-{before}"
            write_mark(lab, f"mark-on-{there}")
        # each host kept its own file: the one left behind has what it had when the VM left
        assert mark_in_file(files[dest], tmp_path) == f"mark-on-{dest}"
        assert read_mark(lab) == f"mark-on-{src}"
    finally:
        lab.detach_nic("ua-data")


def test_bandwidth_auto_converge_parallel_there_and_post_copy_back(
    coordinated: VmLab, record_property: pytest.RecordProperty
) -> None:
    """QEMU had what each option asks for while the job ran, and post-copy really started."""
    lab = coordinated
    src = lab.where()
    migration = move_with(
        lab,
        OTHER[src],
        "--bandwidth",
        "32",
        "--auto-converge",
        "--parallel-connections",
        "2",
    )
    record_property("bandwidth_auto_converge_parallel", plain(migration))
    assert (migration.bandwidth_mib_s, migration.auto_converge) == (32, True)
    assert migration.parallel_connections == migration.multifd_channels == 2
    assert {"auto-converge", "multifd"} <= set(migration.qemu_capabilities), migration
    if migration.memory_bps is not None:
        assert migration.memory_bps <= 1.5 * (32 << 20), migration
    migration = move_with(lab, src, "--postcopy-after", "1", "--bandwidth", "8")
    record_property("postcopy", plain(migration))
    assert "postcopy-ram" in migration.qemu_capabilities, migration
    assert migration.postcopy and migration.postcopy_started, migration
    assert migration.postcopy_reason == "after 1 s"
    assert 1 <= (migration.postcopy_started_after_s or 0) < 5


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


def ptmigd(
    log_path: Path, *args: str
) -> contextlib.AbstractContextManager[tuple[subprocess.Popen[bytes], Path]]:
    return co.ptmigd(log_path, co.journal_path(), *args)


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
        co.migrate(lab, "hosta")
    co.define_pools(lab, {"hostb": []})  # hostb's pool has no device left
    moved = co.migrate(lab, "hostb")
    assert lab.where() == "hostb"
    assert moved.exit_code == 3 and moved.report.outcome is Outcome.DONE_DEGRADED, moved
    assert set(moved.report.teams.values()) == {TeamMode.STANDBY}
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

    moved, losses = measured_move(lab, dest, "drift-done")
    report = moved.report
    record_property("report_drift_done", plain(report))
    record_property("lost_drift_done", losses)

    assert moved.exit_code == 0 and report.outcome is Outcome.DONE, report
    assert report.drift == {"lan": "primary-absent", "wan": "primary-absent"}
    assert report.teams == PRIMARIES
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
        moved, losses = measured_move(lab, dest, "drift-degraded")
    finally:
        co.define_pools(lab, {dest: co.POOL_SLOTS[dest]})
    report = moved.report
    record_property("report_drift_degraded", plain(report))
    record_property("lost_drift_degraded", losses)

    assert moved.exit_code == 3 and report.outcome is Outcome.DONE_DEGRADED, report
    assert report.drift == {"lan": "primary-absent", "wan": "primary-absent"}
    assert report.teams == {"lan": TeamMode.STANDBY, "wan": TeamMode.STANDBY}
    assert lab.where() == dest
    lab.check_health()
    co.wait_for_teams_on_primary(lab)  # the pool has devices again


# -- the error contract against the real libvirtd ----------------------------------------


def test_real_libvirtd_errors_name_their_category_and_change_nothing(
    lab: VmLab, short_tmp: Path
) -> None:
    """A domain hosta's libvirtd (the QEMU driver, over the remote protocol) does not have
    is not found, a host whose libvirtd is not there is unreachable: ``ptmig`` says so in
    one line with exit 7 or 8, ptmigd with NOT_FOUND or UNAVAILABLE; the lab's domain and
    the journal are as they were.  It only reads: it needs the lab's hosts, not its pools."""
    where = lab.where()
    gone = f"qemu+unix:///system?socket={short_tmp}/no-libvirtd/libvirt-sock"
    with Hypervisor(lab.hosts[where].uri) as hv:
        before = hv.domain(DOMAIN_NAME).xml()
    journal_before = co.ptmig(lab, where, "workflows", "--json").stdout

    missing = co.ptmig(lab, where, "status", "ptmig-nonesuch", check=False)
    assert missing.returncode == 7, missing.stderr
    assert missing.stderr.startswith("ptmig: status ptmig-nonesuch: ")
    assert "Domain not found" in missing.stderr and len(missing.stderr.splitlines()) == 1
    unreachable = co.ptmig_at(gone, co.journal_path(), "status", DOMAIN_NAME, check=False)
    assert unreachable.returncode == 8, unreachable.stderr
    assert unreachable.stderr.startswith(f"ptmig: status {DOMAIN_NAME}: cannot connect to ")
    assert len(unreachable.stderr.splitlines()) == 1

    with Journal(short_tmp / "journal.sqlite") as journal:
        daemon = serve(Coordinator(journal), ListenConfig(socket=short_tmp / "run" / "ptmigd.sock"))
        try:
            with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
                stub = pb_grpc.CoordinatorStub(channel)
                for request, code in (
                    (
                        pb.GetStatusRequest(uri=lab.hosts[where].uri, domain="ptmig-nonesuch"),
                        grpc.StatusCode.NOT_FOUND,
                    ),
                    (
                        pb.GetStatusRequest(uri=gone, domain=DOMAIN_NAME),
                        grpc.StatusCode.UNAVAILABLE,
                    ),
                ):
                    with pytest.raises(grpc.RpcError) as caught:
                        stub.GetStatus(request, timeout=60)
                    assert caught.value.code() == code, caught.value.details()
                with pytest.raises(grpc.RpcError) as caught:
                    list(
                        stub.Migrate(
                            pb.MigrateRequest(
                                domain="ptmig-nonesuch",
                                source_uri=lab.hosts[where].uri,
                                destination_uri=lab.hosts[OTHER[where]].uri,
                            ),
                            timeout=60,
                        )
                    )
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            daemon.stop(grace=1)
        assert journal.recent() == []

    with Hypervisor(lab.hosts[where].uri) as hv:
        assert hv.domain(DOMAIN_NAME).xml() == before
    assert co.ptmig(lab, where, "workflows", "--json").stdout == journal_before
