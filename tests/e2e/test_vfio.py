"""The nested vfio lab end to end: ``ptmig migrate`` of an L2 guest whose team lan holds a
real vfio-pci VF (pool kind vf) and team wan a real vfio-pci whole e1000e (pool kind pci).

Slow (L1 under TCG, L2 under nested TCG): selected with ``-m vfio``; see docs/lab.md for
the command and what CI runs.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from host.workflow.model import Outcome
from lab import GUEST_IP, TEAM_MAC, WAN_GUEST_IP, WAN_STANDBY_MAC
from lab.guest import DOMAIN_NAME
from lab.nested import coordinated as co
from lab.nested.l1 import WIRE_NICS
from lab.nested.vlab import L1Pinger, VfioLab, peer_uri, uri

pytestmark = [pytest.mark.e2e, pytest.mark.vfio]

#: Echo requests per second at the nested guest (what it answers without falling behind).
RATE = 100
BURNED_IN = {n.host: n.mac for n in WIRE_NICS if n.model == "e1000e"}


@pytest.fixture(scope="module")
def vlab() -> Iterator[VfioLab]:
    lab = VfioLab()
    try:
        # PTMIG_VLAB_PREPARED=1: `VfioLab().prepare()` ran before the lab lock was taken
        lab.up(prepared=os.environ.get("PTMIG_VLAB_PREPARED") == "1")
        co.define_pools(lab)
        co.set_teams(lab, lan_policy="preserve", wan_policy="preserve")
        co.to_primary(lab)
        yield lab
    finally:
        lab.down()


def migrate(lab: VfioLab, dest: str) -> tuple[int, dict[str, Any]]:
    proc = co.ptmig(lab.where(), "migrate", DOMAIN_NAME, uri(dest), "--json",
                    "--peer-uri", peer_uri(dest), "--unsafe", check=False)
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def l1_driver(lab: VfioLab, pci: str) -> str:
    return lab.l1_exec(f"basename $(readlink /sys/bus/pci/devices/{pci}/driver) 2>/dev/null "
                       "|| echo none").check().strip()


def guest(lab: VfioLab, command: str) -> str:
    return lab.exec(command, timeout=120).check().strip()


def check_devices(lab: VfioLab, on: str) -> None:
    """vfio-pci holds exactly the devices the guest's host gave it; the rest are back."""
    off = "hostb" if on == "hosta" else "hosta"
    xml = lab.domain(on).XMLDesc(0)
    dev_on, dev_off = lab.state.hosts[on], lab.state.hosts[off]
    assert l1_driver(lab, dev_on.whole_pci) == "vfio-pci"
    assert l1_driver(lab, dev_off.whole_pci) == "e1000e", "whole NIC not given back"
    held = [vf for vf in dev_on.vfs if l1_driver(lab, vf) == "vfio-pci"]
    assert len(held) == 1, held
    assert not [vf for vf in dev_off.vfs if l1_driver(lab, vf) == "vfio-pci"]
    # one whole NIC (a <hostdev>) and one VF (an interface on the hostdev network)
    vf_interfaces = xml.count("<interface type='network'") + xml.count("<interface type='hostdev'")
    assert xml.count("<hostdev ") == 1 and vf_interfaces == 1, xml
    # libvirt programmed the VF's MAC through the PF (policy preserve: the team's MAC)
    vf_index = dev_on.vfs.index(held[0])
    pf_links = lab.l1_exec(f"ip -n ptmig-{on} link show {dev_on.pf}").check()
    assert f"vf {vf_index}     link/ether {TEAM_MAC}" in pf_links or \
        f"vf {vf_index} link/ether {TEAM_MAC}" in pf_links, pf_links


def check_guest(lab: VfioLab, on: str) -> None:
    lan = guest(lab, "cat /sys/class/net/bond0/bonding/active_slave")
    wan = guest(lab, "cat /sys/class/net/bond1/bonding/active_slave")
    assert guest(lab, f"cat /sys/class/net/{lan}/address") == TEAM_MAC
    assert guest(lab, f"readlink /sys/class/net/{lan}/device/driver").endswith("igbvf")
    assert guest(lab, f"readlink /sys/class/net/{wan}/device/driver").endswith("e1000e")
    # the whole NIC came back with the destination's burned-in MAC; preserve re-applied
    # the team's own
    perm = guest(lab, f"ethtool -P {wan}").split()[-1]
    assert perm == BURNED_IN[on]
    assert guest(lab, f"cat /sys/class/net/{wan}/address") == WAN_STANDBY_MAC
    lab.check_health()


def test_migrate_vf_and_whole_nic_there_and_back(
        vlab: VfioLab, record_property: pytest.RecordProperty) -> None:
    lab = vlab
    assert lab.where() == "hosta"
    check_devices(lab, "hosta")
    check_guest(lab, "hosta")
    for dest in ("hostb", "hosta"):
        src = lab.where()
        pingers = [L1Pinger(lab, ip, f"{dest}-{team}", RATE)
                   for team, ip in (("lan", GUEST_IP), ("wan", WAN_GUEST_IP))]
        for p in pingers:
            p.start()
        time.sleep(2)
        code, report = migrate(lab, dest)
        time.sleep(2)
        phases = [(p["name"], p["started_at"], p["started_at"] + p["seconds"])
                  for p in report["phases"]]
        losses = {}
        for team, p in zip(("lan", "wan"), pingers, strict=True):
            traffic = p.stop_and_analyze(phases)
            losses[team] = {ph["name"]: ph["lost"] for ph in traffic["phases"]}
        print(f"{src} -> {dest}: {report['phases']}\nlost per phase: {losses}")
        record_property(f"report_{src}_{dest}", report)
        record_property(f"lost_{src}_{dest}", losses)
        assert code == 0 and report["outcome"] == str(Outcome.DONE), report
        assert report["teams"] == {"lan": "primary", "wan": "primary"}
        assert lab.where() == dest
        check_devices(lab, dest)
        check_guest(lab, dest)
