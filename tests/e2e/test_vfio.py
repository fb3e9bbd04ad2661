"""The nested vfio lab end to end: ``ptmig migrate`` of an L2 guest whose team wan holds a
real vfio-pci whole e1000e (pool kind pci) and team lan a real vfio-pci VF (pool kind vf).

Slow (L1 under TCG): selected with ``-m vfio``; docs/lab.md has the command and what CI runs.
Team wan is set first and migrated alone, so the whole-NIC path is proven whatever the VF
does; the VF cases set team lan on the VF pool themselves (`vf_team`).  L0's QEMU is 11.1
(lab.nested.qemu), whose igb VFs decode: the lab fails at once if they do not.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ptmig.serial_session import AGENT_CHANNEL

from host.agent_client import AgentClient, AgentEndpoint
from host.agent_client.state import LinkState, TeamEvent, TeamState
from host.domain.devices import pci_hostdev_xml
from host.hypervisor import Hypervisor
from host.workflow.model import Outcome, TeamMode, plain
from lab import GUEST_IP, STANDBY_MAC, TEAM_MAC, WAN_GUEST_IP, WAN_STANDBY_MAC
from lab.coordinated import ptmigd
from lab.guest import DOMAIN_NAME
from lab.migration import Hop, migrate_args
from lab.nested import coordinated as co
from lab.nested import orchestrated as orch
from lab.nested.l1 import WIRE_NICS
from lab.nested.vlab import AGENT_CONFIG, L1Pinger, VfioLab, peer_uri, uri
from lab.orchestrated import bus_of
from lab.traffic import Phase

pytestmark = [pytest.mark.e2e, pytest.mark.vfio]

#: Echo requests per second at the nested guest.
RATE = 100
BURNED_IN = {n.host: n.mac for n in WIRE_NICS if n.model == "e1000e"}
OTHER = {"hosta": "hostb", "hostb": "hosta"}


@pytest.fixture(scope="module")
def vlab() -> Iterator[VfioLab]:
    lab = VfioLab()
    try:
        # PTMIG_VLAB_PREPARED=1: `VfioLab().prepare()` ran before the lab lock was taken
        lab.up(prepared=os.environ.get("PTMIG_VLAB_PREPARED") == "1")
        # the run says which QEMU it ran on: unfixed, the L2 hang can take a test (docs/lab.md)
        print(f"L0's QEMU {lab.state.qemu}, fixes {lab.state.qemu_fixes}")
        undecoded = [h for h, d in lab.state.hosts.items() if not d.vf_bar_decodes]
        assert not undecoded, (
            f"L0's QEMU {lab.state.qemu} should decode the igb VFs' BARs, but on {undecoded} "
            "they read 0 (docs/lab.md: igbvf in L2)"
        )
        co.define_pools(lab)
        try:
            wan_on_whole_nic(lab)
        except Exception:
            lab.print_evidence()  # CI once saw only DEADLINE_EXCEEDED here for 300 s
            if lab.l2_hang() is None:
                raise
            bring_back(lab)  # the L2 hang at the first plug: below ptmig (docs/lab.md)
        yield lab
    finally:
        lab.down()


def bring_back(lab: VfioLab) -> None:
    """After the L2 hang (docs/lab.md: an interrupt delivered into L2 with interrupts off,
    below its kernel): L2 booted again and team wan on its whole NIC, as the module
    starts.  Printed, so the run says it happened."""
    print("L2 hung (its stall report is above or in the last test's report); booting it again")
    lab.restart_guest()
    wan_on_whole_nic(lab)


def start_again(lab: VfioLab) -> None:
    """After L1 restarted (its kernel failed in L2's vCPU thread: docs/lab.md), or its
    console stopped running commands (``VfioLab.l1_console_report``): the whole
    lab up again, as the module starts.  Printed, so the run says it happened."""
    print(
        "L1 restarted or its console is wedged (its report is in the last test's, or above); "
        "the nested lab comes up again"
    )
    lab.down()
    lab.up(prepared=True)  # the module's bring-up prepared the images
    co.define_pools(lab)
    wan_on_whole_nic(lab)


def wan_on_whole_nic(lab: VfioLab) -> None:
    """Team wan set on the whole e1000e (policy preserve) and on it: the module's start."""
    co.team_set(lab, "wan", "preserve")
    co.to_primary(lab, timeout=300)


@pytest.fixture(autouse=True)
def l2_answering(vlab: VfioLab) -> None:
    """Each test starts with an L2 that answers: one the L2 hang took in an earlier test
    (reported there as an expected failure with its stall report: tests/e2e/conftest.py)
    is booted again and set up as the module's start, and after an L1 restart so is the
    whole lab.  (The hang watch, lab.nested.hangwatch, is not run here: docs/lab.md, "The
    hang watch".)  An L1 whose console runs nothing (its report printed) is started again
    too: every step of a test, and of bringing L2 back, runs on that console."""
    wedged = vlab.l1_console_report()
    if wedged is not None:
        print(wedged)
        start_again(vlab)
    elif vlab.l1_restart_report() is not None:
        start_again(vlab)
    elif not vlab.answers():
        bring_back(vlab)
    vlab.mark_boot()  # an L2 reset during the test is told by its boot id (conftest)


def l1_driver(lab: VfioLab, pci: str) -> str:
    return (
        lab.l1_exec(
            f"basename $(readlink /sys/bus/pci/devices/{pci}/driver) 2>/dev/null || echo none"
        )
        .check()
        .strip()
    )


def guest(lab: VfioLab, command: str) -> str:
    return lab.exec(command, timeout=120).check().strip()


def check_whole_nic(lab: VfioLab, on: str) -> None:
    """vfio-pci holds the guest's host's e1000e, the other host's is back on e1000e; in the
    guest the whole NIC shows the destination's burned-in MAC and preserve re-applied the
    team's own."""
    xml = lab.domain(on).XMLDesc(0)
    assert xml.count("<hostdev ") == 1, xml
    assert l1_driver(lab, lab.state.hosts[on].whole_pci) == "vfio-pci"
    assert l1_driver(lab, lab.state.hosts[OTHER[on]].whole_pci) == "e1000e", "not given back"
    wan = guest(lab, "cat /sys/class/net/bond1/bonding/active_slave")
    assert guest(lab, f"readlink /sys/class/net/{wan}/device/driver").endswith("e1000e")
    assert guest(lab, f"ethtool -P {wan}").split()[-1] == BURNED_IN[on]
    assert guest(lab, f"cat /sys/class/net/{wan}/address") == WAN_STANDBY_MAC


def check_vf(lab: VfioLab, on: str) -> None:
    """One VF of the guest's host is on vfio-pci with the team's MAC programmed by libvirt
    through the PF; none of the other host's; in the guest igbvf drives it."""
    dev = lab.state.hosts[on]
    held = [vf for vf in dev.vfs if l1_driver(lab, vf) == "vfio-pci"]
    assert len(held) == 1, held
    assert not [vf for vf in lab.state.hosts[OTHER[on]].vfs if l1_driver(lab, vf) == "vfio-pci"]
    pf_links = lab.l1_exec(f"ip -n ptmig-{on} link show {dev.pf}").check()
    assert any(
        line.split()[:2] == ["vf", str(dev.vfs.index(held[0]))] and TEAM_MAC in line
        for line in pf_links.splitlines()
    ), pf_links
    lan = guest(lab, "cat /sys/class/net/bond0/bonding/active_slave")
    assert guest(lab, f"readlink /sys/class/net/{lan}/device/driver").endswith("igbvf")
    assert guest(lab, f"cat /sys/class/net/{lan}/address") == TEAM_MAC


def there_and_back(
    lab: VfioLab, teams: dict[str, str], record: pytest.RecordProperty, checks: list[Any]
) -> None:
    """From wherever the guest is to the other host and back, under ping."""
    start = lab.where()
    for dest in (OTHER[start], start):
        src = lab.where()
        pingers = {team: L1Pinger(lab, ip, f"{dest}-{team}", RATE) for team, ip in teams.items()}
        for p in pingers.values():
            p.start()
        time.sleep(2)
        moved = co.migrate(lab, dest)
        time.sleep(2)
        losses = {}
        for team, p in pingers.items():
            traffic = p.stop_and_analyze(moved.phases)
            losses[team] = {ph["name"]: ph["lost"] for ph in traffic["phases"]}
        report = moved.report
        print(f"{src} -> {dest}: {report.phases}\nlost per phase at {RATE}/s: {losses}")
        record(f"report_{src}_{dest}", plain(report))
        record(f"lost_{src}_{dest}", losses)
        assert moved.exit_code == 0 and report.outcome is Outcome.DONE, report
        assert report.teams == dict.fromkeys(teams, TeamMode.PRIMARY)
        assert lab.where() == dest
        for check in checks:
            check(lab, dest)
        lab.check_health()


def test_whole_nic_migrates_there_and_back(
    vlab: VfioLab, record_property: pytest.RecordProperty
) -> None:
    assert vlab.where() == "hosta"
    check_whole_nic(vlab, "hosta")
    there_and_back(vlab, {"wan": WAN_GUEST_IP}, record_property, [check_whole_nic])


def test_failover_to_standby_and_back_with_the_whole_nic(vlab: VfioLab) -> None:
    lab = vlab
    on = lab.where()
    assert co.ptmig_json(on, "failover", DOMAIN_NAME, "--to", "standby")["teams"] == {
        "wan": "standby"
    }
    active = guest(lab, "cat /sys/class/net/bond1/bonding/active_slave")
    assert guest(lab, f"ethtool -P {active}").split()[-1] == WAN_STANDBY_MAC  # the virtio
    assert guest(lab, "cat /sys/class/net/bond1/address") == WAN_STANDBY_MAC
    assert co.ptmig_json(on, "failover", DOMAIN_NAME, "--to", "primary")["teams"] == {
        "wan": "primary"
    }
    check_whole_nic(lab, on)
    lab.check_health()


#: A peer URI the source's libvirtd cannot reach (nothing listens on port 1 of its
#: namespace's loopback): the migration job fails after the whole NIC was unplugged.
UNREACHABLE_PEER = "qemu+tcp://127.0.0.1:1/system"


def rollback(lab: VfioLab, teams: dict[str, str]) -> str:
    """A migration whose job fails after the unplug (*teams* plugged before it): rolled back
    onto the source with every team on a primary again.  Returns the source."""
    on = lab.where()
    moved = co.migrate(lab, OTHER[on], peer=UNREACHABLE_PEER)
    report = moved.report
    print(f"rollback: {report.phases}")
    assert moved.exit_code == 4 and report.outcome is Outcome.ROLLED_BACK, report
    assert "unplug" in [p.name for p in report.phases], "nothing was unplugged"
    assert report.teams == teams
    assert lab.where() == on
    return on


def test_whole_nic_rollback_plugs_it_again_on_the_source(vlab: VfioLab) -> None:
    on = rollback(vlab, {"wan": "primary"})
    check_whole_nic(vlab, on)  # on vfio-pci again here; the other host's never taken
    vlab.check_health()


def test_whole_nic_under_mac_policy_none(vlab: VfioLab) -> None:
    """Policy none: the agent leaves the new NIC's MAC alone; team wan's agent-owned bond
    (fail_over_mac none) gives its members the bond's MAC as they join."""
    lab = vlab
    dest = OTHER[lab.where()]
    set_wan_policy(lab, "none")
    try:
        moved = co.migrate(lab, dest)
        assert moved.exit_code == 0 and moved.report.outcome is Outcome.DONE, moved
        assert moved.report.teams == {"wan": TeamMode.PRIMARY}
        check_whole_nic(lab, dest)
    finally:
        set_wan_policy(lab, "preserve")
    lab.check_health()


def set_wan_policy(lab: VfioLab, policy: str) -> None:
    (wan,) = co.ptmig_json(lab.where(), "team-show", DOMAIN_NAME)["teams"]
    co.team_set(lab, "wan", policy, primary_alias=wan["primary"]["alias"])


@pytest.fixture
def vf_team(vlab: VfioLab) -> VfioLab:
    """Team lan on a VF of the guest's host's pool under preserve, bound and active."""
    lab = vlab
    shown = co.ptmig_json(lab.where(), "team-show", DOMAIN_NAME)["teams"]
    lan = next((t for t in shown if t["name"] == "lan"), None)
    alias = lan["primary"]["alias"] if lan and lan["primary"] else None
    co.team_set(lab, "lan", "preserve", primary_alias=alias)
    co.to_primary(lab, timeout=300)
    check_vf(lab, lab.where())
    return lab


def test_vf_binds_and_migrates_there_and_back_beside_the_whole_nic(
    vf_team: VfioLab, record_property: pytest.RecordProperty
) -> None:
    """Both teams at once: lan on a VF (hosta's pool by PF, hostb's by VF list), wan on
    the whole e1000e."""
    there_and_back(
        vf_team,
        {"lan": GUEST_IP, "wan": WAN_GUEST_IP},
        record_property,
        [check_vf, check_whole_nic],
    )


def test_vf_failover_to_standby_and_back(vf_team: VfioLab) -> None:
    lab = vf_team
    on = lab.where()
    assert co.ptmig_json(on, "failover", DOMAIN_NAME, "--to", "standby")["teams"] == {
        "lan": "standby",
        "wan": "standby",
    }
    active = guest(lab, "cat /sys/class/net/bond0/bonding/active_slave")
    assert guest(lab, f"readlink /sys/class/net/{active}/device/driver").endswith("virtio_net")
    status = co.ptmig_json(on, "status", DOMAIN_NAME)
    assert {t["name"]: t["mode"] for t in status["teams"]} == {"lan": "standby", "wan": "standby"}
    assert co.ptmig_json(on, "failover", DOMAIN_NAME, "--to", "primary")["teams"] == {
        "lan": "primary",
        "wan": "primary",
    }
    check_vf(lab, on)
    check_whole_nic(lab, on)
    lab.check_health()


def test_vf_rollback_plugs_a_vf_again_on_the_source(vf_team: VfioLab) -> None:
    on = rollback(vf_team, {"lan": "primary", "wan": "primary"})
    check_vf(vf_team, on)  # one VF held here again, none of the other host's: none leaked
    check_whole_nic(vf_team, on)
    vf_team.check_health()


def hold_vfs(lab: VfioLab, host: str) -> str:
    """Define (not start) a domain on *host* that names each of its VFs as a hostdev: the
    VF pool there has no free device until it is undefined.  Returns its name."""
    name = "ptmig-vf-holder"
    hostdevs = "".join(
        pci_hostdev_xml(alias=f"ua-held-{i}", pci_address=vf)
        for i, vf in enumerate(lab.state.hosts[host].vfs)
    )
    lab.conn(host).defineXML(
        f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
        f"<os><type arch='x86_64' machine='q35'>hvm</type></os><devices>{hostdevs}</devices>"
        "</domain>"
    )
    return name


def test_empty_destination_vf_pool_gives_degraded_then_the_reconciler_repairs(
    vf_team: VfioLab, tmp_path: Path
) -> None:
    lab = vf_team
    src = lab.where()
    dest = OTHER[src]
    holder = hold_vfs(lab, dest)
    try:
        moved = co.migrate(lab, dest)
        assert moved.exit_code == 3 and moved.report.outcome is Outcome.DONE_DEGRADED, moved
        assert moved.report.teams == {"lan": TeamMode.STANDBY, "wan": TeamMode.PRIMARY}
        assert lab.where() == dest
        status = co.ptmig_json(dest, "status", DOMAIN_NAME)
        assert {t["name"]: t["mode"] for t in status["teams"]} == {
            "lan": "degraded",
            "wan": "primary",
        }
        assert not [v for v in lab.state.hosts[src].vfs if l1_driver(lab, v) == "vfio-pci"]
    finally:
        lab.conn(dest).lookupByName(holder).undefine()
    # a VF is free again: ptmigd's reconciler on the destination binds one
    log_path = tmp_path / "ptmigd.log"
    with ptmigd(log_path, co.journal(), "--reconcile", uri(dest), "--reconcile-interval", "5"):
        deadline = time.monotonic() + 600
        while True:
            teams = co.ptmig_json(dest, "team-show", DOMAIN_NAME)["teams"]
            if all(t["primary"] for t in teams):
                break
            assert time.monotonic() < deadline, (teams, log_path.read_text())
            time.sleep(5)
    check_vf(lab, dest)
    check_whole_nic(lab, dest)
    lab.check_health()


def test_vf_under_mac_policy_none_migrates(vf_team: VfioLab) -> None:
    """Policy none: the agent leaves MACs alone; the host programs the VF with the team's
    MAC through the PF, which is the bond's, so the bond (fail_over_mac none) takes it."""
    lab = vf_team
    dest = OTHER[lab.where()]
    set_lan(lab, "none")
    try:
        moved = co.migrate(lab, dest)
        assert moved.exit_code == 0 and moved.report.outcome is Outcome.DONE, moved
        assert moved.report.teams == {"lan": TeamMode.PRIMARY, "wan": TeamMode.PRIMARY}
        check_vf(lab, dest)
    finally:
        set_lan(lab, "preserve")
    lab.check_health()


def test_vf_whose_team_mac_is_not_the_bonds_is_refused_in_preflight(vf_team: VfioLab) -> None:
    """A VF cannot take another MAC in the guest, and bond0 (fail_over_mac none) gives its
    members its own: a team MAC apart from the bond's is refused before anything changes,
    by migrate and by failover, each with the line that says what to set."""
    lab = vf_team
    on = lab.where()
    before = lab.domain(on).XMLDesc(0)
    set_lan(lab, "preserve", team_mac="52:54:00:cc:00:01")
    try:
        hop = Hop(uri(on), uri(OTHER[on]), peer_uri(OTHER[on]))
        proc = co.ptmig(on, *migrate_args(DOMAIN_NAME, hop, as_json=False), check=False)
        assert proc.returncode == 4, (proc.returncode, proc.stderr)
        said = proc.stderr.strip().splitlines()[-1]
        assert said.startswith(
            f"ptmig: migrate {DOMAIN_NAME}: refused, nothing changed: team lan: a VF"
        ), said
        assert f"--team-mac {TEAM_MAC}" in said, said
        assert lab.where() == on
        assert lab.domain(on).XMLDesc(0).count("<hostdev ") == before.count("<hostdev ")
        check_vf(lab, on)
        # failover of a team whose VF is gone: refused before a plug, and it says why
        co.ptmig_json(on, "failover", DOMAIN_NAME, "--to", "standby")
        lan_alias = next(
            t["primary"]["alias"]
            for t in co.ptmig_json(on, "team-show", DOMAIN_NAME)["teams"]
            if t["name"] == "lan"
        )
        lab.detach(on, lan_alias, config=True)  # live and config, as virsh would
        back = co.ptmig_json(on, "failover", DOMAIN_NAME, "--to", "primary", ok=(3,))
        assert back["teams"] == {"lan": "standby", "wan": "primary"}, back
        assert "--team-mac" in back["why"]["lan"], back
        assert not [vf for vf in lab.state.hosts[on].vfs if l1_driver(lab, vf) == "vfio-pci"]
    finally:
        set_lan(lab, "preserve")
    co.to_primary(lab, timeout=300)
    check_vf(lab, on)
    lab.check_health()


def set_lan(lab: VfioLab, policy: str, team_mac: str | None = None) -> None:
    """Team lan's record changed in place; its plugged VF, if any, kept as its primary."""
    (lan,) = [
        t
        for t in co.ptmig_json(lab.where(), "team-show", DOMAIN_NAME)["teams"]
        if t["name"] == "lan"
    ]
    args = ["--team", "lan", "--standby-mac", STANDBY_MAC, "--pool", co.VF_POOL]
    args += ["--mac-policy", policy]
    if lan["primary"]:
        args += ["--primary-alias", lan["primary"]["alias"]]
    if team_mac:
        args += ["--team-mac", team_mac]
    co.ptmig(lab.where(), "team-set", DOMAIN_NAME, *args)


def test_a_stalled_l2_gives_a_stall_report_and_a_running_one_none(vlab: VfioLab) -> None:
    """The evidence a failed nested test carries when L2 stops answering (the L2 hang
    after a VF hot-plug, docs/lab.md): here L2 is paused, so it answers nothing."""
    assert vlab.stall_report() is None
    host = vlab.where()
    vlab.domain(host).suspend()
    try:
        report = vlab.stall_report()
    finally:
        vlab.domain(host).resume()
    assert report is not None
    assert "L2 vCPU time over 1 s on " + host + ": 0.00 s" in report  # paused: no vCPU time
    assert "RIP=" in report, report  # info registers
    assert "--- (qemu) i /w 0x620" in report and "(failed" not in report, report
    assert "invalid char" not in report, report  # HMP took every command
    assert "--- (qemu) x /96gx RSP" in report, report  # L2's kernel stack
    assert "--- L1 /proc/interrupts" in report and "CPU0" in report, report
    assert "/irq_exits:" in report and "/exits:" in report, report  # L1's KVM counters
    # The probe was typed into a paused guest, whose console took only part of it: the
    # shell waits for the rest.  A timed-out command ends with a Ctrl-C, which frees it.
    answered = any(vlab.exec("true", timeout=20).status == 0 for _ in range(3))
    assert answered, "L2's console did not answer again after the resume"
    vlab.check_health()


# -- the VF moved the way OpenStack Nova moves it, the agent alone in the guest ----------

#: Seconds from Nova's attach returning to team lan active on the new VF, read by GetState
#: calls back to back over the nested channel.  The bound: L2's hot-plug and igbvf's probe
#: (igbvf waits up to 2 s on the PF's mailbox) and the agent's own bind deadline
#: (default_timeout_ms, 10 s), on a nested guest whose vCPU L0's TCG runs, doubled.
#: Measured 3.05 s (after the migration) and 2.18 s (after a surprise removal), one run
#: (docs/benchmarks/orchestrated.md).
BACK_ON_VF_S = 60.0


@contextlib.contextmanager
def agent_at(host: str) -> Iterator[AgentClient]:
    """An AgentClient to L2 on *host*, over its channel: the test only observes with it."""
    hv = Hypervisor(uri(host))
    dom = hv.domain(DOMAIN_NAME)
    client = AgentClient(AgentEndpoint(serial=lambda: dom.open_channel(AGENT_CHANNEL)))
    try:
        yield client
    finally:
        client.close()
        hv.close()


def lan_state(client: AgentClient) -> tuple[TeamState, dict[str, LinkState]]:
    state = client.state()
    return next(t for t in state.teams if t.name == "lan"), {ln.name: ln for ln in state.links}


def wait_lan_on_vf(host: str, not_at: str = "") -> tuple[float, TeamState, LinkState]:
    """Seconds until lan's active member is a primary other than the standby (and not at
    guest PCI address *not_at*), read back to back; the team and that link."""
    started = time.monotonic()
    with agent_at(host) as client:
        while True:
            team, links = lan_state(client)
            active = links.get(team.active_member)
            if (
                active is not None
                and team.active_member == team.primary
                and team.active_member != team.standby
                and active.pci_address != not_at
            ):
                return time.monotonic() - started, team, active
            assert time.monotonic() - started < BACK_ON_VF_S, f"lan not back on a VF: {team}"


def wait_lan_lost(host: str, timeout: float = 60) -> TeamEvent:
    """lan's primary-lost event, once the agent has confirmed the standby."""
    started = time.monotonic()
    with agent_at(host) as client:
        while True:
            team, _ = lan_state(client)
            if team.last_event is not None and team.last_event.kind == "primary-lost":
                assert team.active_member == team.standby, team
                return team.last_event
            assert time.monotonic() - started < timeout, f"no primary-lost recorded: {team}"


def check_lan_whole(lab: VfioLab, on: str, device: str) -> TeamState:
    """check_vf, and in the agent's words: lan guest-managed, standby + *device* only (no
    VF bound twice), its last event the bind of *device*."""
    check_vf(lab, on)
    with agent_at(on) as client:
        team, _ = lan_state(client)
    assert team.managed_by_guest
    assert sorted(team.members) == sorted([team.standby, device]), "nothing bound twice"
    assert team.active_member == device and team.mac == TEAM_MAC
    assert team.last_event is not None, team
    assert (team.last_event.kind, team.last_event.device, team.last_event.ok) == (
        "primary-bound",
        device,
        True,
    ), team.last_event
    return team


def test_nova_style_vf_move_and_surprise_removal_with_the_agent_alone(
    vlab: VfioLab, record_property: pytest.RecordProperty
) -> None:
    """Team lan managed_by guest (rule: driver igbvf); libvirt driven as Nova drives it for
    an SR-IOV port (lab.nested.orchestrated), no ptmig command on the host: the port's VF
    plugged, under ping detached before the migration, plain live migration, a VF of the
    destination's pool plugged with the port's MAC at another guest PCI address; then,
    under policy none, that VF pulled with no migration and another VF plugged.  Each time
    the agent alone binds the VF and the team ends on it with the MAC its policy says."""
    lab = vlab
    src = lab.where()
    dest = OTHER[src]
    for alias in orch.lan_vifs(lab, src):  # a VF ptmig plugged for lan: Nova starts from none
        lab.detach(src, alias, config=True)
    # libvirt migrates no domain with a vfio device: team wan's whole NIC goes first too, as
    # Nova detaches every passthrough port (wan is the coordinator's: ptmig plugs it again
    # at the end)
    for alias in orch.passthrough_aliases(lab, src, "ua-ptmig-wan-"):
        lab.detach(src, alias, config=True)
    orch.configure_agent(lab, orch.guest_managed_config("preserve"))
    figures: dict[str, Any] = {}
    try:
        # Nova's boot of the port: a VF of the source's, the port's MAC programmed by the PF
        alias = orch.plug_vf(lab, src, lab.state.hosts[src].vfs[0], 1)
        figures["first_bind_s"], _, old = wait_lan_on_vf(src)
        check_lan_whole(lab, src, old.name)
        old_bus = bus_of(lab.domain(src), alias)

        pinger = L1Pinger(lab, GUEST_IP, "nova-move", RATE)
        pinger.start()
        time.sleep(2)
        t0 = time.time()
        lab.detach(src, alias, config=True)  # Nova's detach_interface: config, then live
        t1 = time.time()
        event = wait_lan_lost(src)
        assert (event.device, event.ok) == (old.name, True) and "removed" in event.reason
        t2 = time.time()
        figures["migrate_s"] = round(orch.migrate(lab, dest), 2)
        t3 = time.time()
        new_vf = lab.state.hosts[dest].vfs[0]
        alias = orch.plug_vf(lab, dest, new_vf, 2, avoid_bus=old_bus)
        t4 = time.time()
        took, _, new = wait_lan_on_vf(dest, not_at=old.pci_address)
        t5 = time.time()
        time.sleep(2)
        # the orchestrator's attach (libvirt and QEMU in L1 map the VF while L2 waits: 3.2-5.9 s
        # in CI, 124 lost at 5.9 s) apart from what follows it, the agent's bind
        phases = [
            Phase("unplug", t0, t1),
            Phase("migrate", t2, t3),
            Phase("attach", t3, t4),
            Phase("plug", t4, t5),
        ]
        lost = {p["name"]: p["lost"] for p in pinger.stop_and_analyze(phases)["phases"]}
        figures["back_on_vf_after_plug_s"] = round(took, 2)
        figures["attach_call_s"] = round(t4 - t3, 2)
        figures["move_lost"] = lost
        print(
            f"Nova-style move {src} -> {dest}: {figures}; pci {old.pci_address} -> "
            f"{new.pci_address}; VF {new_vf}"
        )
        assert lab.where() == dest
        assert new.pci_address != old.pci_address
        team = check_lan_whole(lab, dest, new.name)
        assert team.last_event is not None and "plugged, matches its rule" in team.last_event.reason
        lab.check_health()
        # what the host is told: ptmig status (read only) shows the agent's own bind
        (shown,) = [
            t for t in co.ptmig_json(dest, "status", DOMAIN_NAME)["teams"] if t["name"] == "lan"
        ]
        # (mode and case are ptmig's record's: a VF ptmig plugged earlier and Nova detached
        # leaves lan recorded on a primary that is gone; with no record it is guest-managed)
        assert shown["managed_by_guest"], shown
        assert (shown["last_event"]["kind"], shown["last_event"]["device"]) == (
            "primary-bound",
            new.name,
        )
        print(co.ptmig(dest, "status", DOMAIN_NAME).stdout)

        # surprise removal under policy none: the VF pulled, no migration, another plugged
        orch.configure_agent(lab, orch.guest_managed_config("none"))
        pinger = L1Pinger(lab, GUEST_IP, "nova-removal", RATE)
        pinger.start()
        time.sleep(2)
        t0 = time.time()
        lab.detach(dest, alias, config=True)
        t1 = time.time()
        assert wait_lan_lost(dest).ok
        t2 = time.time()
        alias = orch.plug_vf(lab, dest, lab.state.hosts[dest].vfs[1], 3)
        t3 = time.time()
        took, _, again = wait_lan_on_vf(dest, not_at=new.pci_address)
        t4 = time.time()
        time.sleep(2)
        phases = [Phase("removal", t0, t1), Phase("attach", t2, t3), Phase("plug", t3, t4)]
        lost = {p["name"]: p["lost"] for p in pinger.stop_and_analyze(phases)["phases"]}
        figures["none_back_on_vf_after_plug_s"] = round(took, 2)
        figures["removal_lost"] = lost
        print(f"surprise removal and a new VF on {dest} (policy none): {figures}")
        check_lan_whole(lab, dest, again.name)  # none: the MAC is the one the PF gave it
        lab.check_health()
        record_property("nova_vf_figures", figures)
        # the agent's part: from the attach's return until the team is on the VF
        assert figures["move_lost"]["plug"] <= RATE and lost["plug"] <= RATE, figures
    finally:
        on = lab.where()
        for alias in orch.lan_vifs(lab, on):
            lab.detach(on, alias, config=True)
        orch.configure_agent(lab, AGENT_CONFIG)
        co.to_primary(lab, timeout=300)  # team wan's whole NIC, by ptmig
