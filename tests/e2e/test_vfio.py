"""The nested vfio lab end to end: ``ptmig migrate`` of an L2 guest whose team wan holds a
real vfio-pci whole e1000e (pool kind pci) and team lan a real vfio-pci VF (pool kind vf).

Slow (L1 under TCG): selected with ``-m vfio``; docs/lab.md has the command and what CI runs.
Team wan is set first and migrated alone, so the whole-NIC path is proven whatever the VF
does; the VF team is added afterwards.
"""

from __future__ import annotations

import json
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from typing import Any

import pytest

from host.workflow.model import Outcome
from lab import GUEST_IP, TEAM_MAC, WAN_GUEST_IP, WAN_STANDBY_MAC
from lab.guest import DOMAIN_NAME
from lab.nested import coordinated as co
from lab.nested.l1 import WIRE_NICS
from lab.nested.vlab import L1Pinger, VfioLab, VfioLabError, peer_uri, uri

pytestmark = [pytest.mark.e2e, pytest.mark.vfio]

#: Echo requests per second at the nested guest.
RATE = 100
BURNED_IN = {n.host: n.mac for n in WIRE_NICS if n.model == "e1000e"}
OTHER = {"hosta": "hostb", "hostb": "hosta"}
#: What igbvf logs in L2 when its reset handshake with the PF gets no answer (docs/lab.md).
IGBVF_BLOCKED = "PF still in reset state"


@pytest.fixture(scope="module")
def vlab() -> Iterator[VfioLab]:
    lab = VfioLab()
    try:
        # PTMIG_VLAB_PREPARED=1: `VfioLab().prepare()` ran before the lab lock was taken
        lab.up(prepared=os.environ.get("PTMIG_VLAB_PREPARED") == "1")
        co.define_pools(lab)
        co.team_set(lab, "wan", "preserve")
        co.to_primary(lab, timeout=300)
        yield lab
    finally:
        lab.down()


def migrate(lab: VfioLab, dest: str) -> tuple[int, dict[str, Any]]:
    proc = co.ptmig(
        lab.where(),
        "migrate",
        DOMAIN_NAME,
        uri(dest),
        "--json",
        "--peer-uri",
        peer_uri(dest),
        "--unsafe",
        check=False,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


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
    for dest in ("hostb", "hosta"):
        src = lab.where()
        pingers = {team: L1Pinger(lab, ip, f"{dest}-{team}", RATE) for team, ip in teams.items()}
        for p in pingers.values():
            p.start()
        time.sleep(2)
        code, report = migrate(lab, dest)
        time.sleep(2)
        phases = [
            (p["name"], p["started_at"], p["started_at"] + p["seconds"]) for p in report["phases"]
        ]
        losses = {}
        for team, p in pingers.items():
            traffic = p.stop_and_analyze(phases)
            losses[team] = {ph["name"]: ph["lost"] for ph in traffic["phases"]}
        print(f"{src} -> {dest}: {report['phases']}\nlost per phase at {RATE}/s: {losses}")
        record(f"report_{src}_{dest}", report)
        record(f"lost_{src}_{dest}", losses)
        assert code == 0 and report["outcome"] == str(Outcome.DONE), report
        assert report["teams"] == dict.fromkeys(teams, "primary")
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


def test_whole_nic_rollback_plugs_it_again_on_the_source(vlab: VfioLab) -> None:
    lab = vlab
    on = lab.where()
    proc = co.ptmig(
        on,
        "migrate",
        DOMAIN_NAME,
        uri(OTHER[on]),
        "--json",
        "--peer-uri",
        UNREACHABLE_PEER,
        "--unsafe",
        check=False,
    )
    report = json.loads(proc.stdout)
    print(f"rollback: {report['phases']}")
    assert proc.returncode == 4 and report["outcome"] == str(Outcome.ROLLED_BACK), report
    assert "unplug" in [p["name"] for p in report["phases"]], "the NIC was never unplugged"
    assert report["teams"] == {"wan": "primary"}
    assert lab.where() == on
    check_whole_nic(lab, on)  # on vfio-pci again here; the other host's never taken
    lab.check_health()


def test_whole_nic_under_mac_policy_none(vlab: VfioLab) -> None:
    """Policy none: the agent leaves the new NIC's MAC alone; team wan's agent-owned bond
    (fail_over_mac none) gives its members the bond's MAC as they join."""
    lab = vlab
    dest = OTHER[lab.where()]
    set_wan_policy(lab, "none")
    try:
        code, report = migrate(lab, dest)
        assert code == 0 and report["outcome"] == str(Outcome.DONE), report
        assert report["teams"] == {"wan": "primary"}
        check_whole_nic(lab, dest)
    finally:
        set_wan_policy(lab, "preserve")
    lab.check_health()


def set_wan_policy(lab: VfioLab, policy: str) -> None:
    (wan,) = co.ptmig_json(lab.where(), "team-show", DOMAIN_NAME)["teams"]
    co.team_set(lab, "wan", policy, primary_alias=wan["primary"]["alias"])


def test_vf_binds_and_migrates_there_and_back(
    vlab: VfioLab, record_property: pytest.RecordProperty
) -> None:
    lab = vlab
    co.team_set(lab, "lan", "preserve")
    try:
        co.to_primary(lab, timeout=150)  # a failed VF bind takes about 30 s a try
    except VfioLabError:
        # A failed bind is compensated: no VF may stay plugged or on vfio-pci.
        time.sleep(30)
        on = lab.where()
        devices = ET.fromstring(lab.domain(on).XMLDesc(0)).find("devices")
        assert devices is not None
        assert not devices.findall("interface[@type='hostdev']")
        assert not [vf for vf in lab.state.hosts[on].vfs if l1_driver(lab, vf) == "vfio-pci"]
        # Counted in the guest: a whole dmesg through two nested consoles outlasts 120 s.
        # Expected only while L0's QEMU leaves the VF BARs unmapped (docs/lab.md) and igbvf
        # says so; a VF that decodes its BAR and still fails to bind fails the test.
        undecoded = [h for h, d in lab.state.hosts.items() if not d.vf_bar_decodes]
        if undecoded and guest(lab, f"dmesg | grep -c '{IGBVF_BLOCKED}' || true") != "0":
            pytest.xfail(
                f"QEMU's igb VF BARs not decoded on {undecoded}, igbvf in L2: "
                f"{IGBVF_BLOCKED!r} (docs/lab.md: igbvf in L2)"
            )
        raise
    check_vf(lab, lab.where())
    there_and_back(
        lab, {"lan": GUEST_IP, "wan": WAN_GUEST_IP}, record_property, [check_vf, check_whole_nic]
    )
