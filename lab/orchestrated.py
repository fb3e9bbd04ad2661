"""A guest's passthrough NIC moved the way an orchestrator moves it, with no ptmig on the host.

OpenStack Nova (SR-IOV live migration since Train), KubeVirt (SR-IOV live migration) and an
operator with virsh all drive libvirt alone: detach the primary with
virDomainDetachDeviceFlags(VIR_DOMAIN_AFFECT_LIVE) and wait for libvirt's
DEVICE_REMOVED (here: for the alias to leave the live XML), migrate with virDomainMigrate*
(peer to peer, `VmLab.migrate`), then attach a NIC of the destination's own with
virDomainAttachDeviceFlags(VIR_DOMAIN_AFFECT_LIVE).  Nobody calls the guest agent: a team
`managed_by = "guest"` (guest_agent.autonomy) must keep itself whole.  See
docs/operator-guide.md, "ptmig-agent under OpenStack Nova, KubeVirt or your own tooling".

The destination's "pool" here is the orchestrator's own list of free devices on each host:
for the emulated lab a tap and a burned-in MAC per host, plugged into a PCI slot other than
the one the old primary had (a whole NIC from another host has another MAC and sits at
another address).
"""

from __future__ import annotations

import base64
import time
import xml.etree.ElementTree as ET

import libvirt

from host.domain.domain_xml import device_aliases
from lab.guest import Nic
from lab.image import AGENT_CONFIG
from lab.vmlab import LabError, VmLab

#: The lab guest's agent.toml (lab.image.AGENT_CONFIG) with team lan guest-managed: any
#: e1000e plugged while lan has no primary is bound into bond0 with lan's MAC (preserve).
#: Team wan stays coordinator-managed and agent-owned; its primary, an e1000e too, is its
#: configured `primary`, which no other team's rule takes.
GUEST_MANAGED_CONFIG = AGENT_CONFIG.replace(
    'ownership = "admin"\n',
    'ownership = "admin"\nmanaged_by = "guest"\nprimary_rule = {driver = "e1000e"}\n',
)

#: Then team wan guest-managed instead (MAC policy follow), lan back to the coordinator's.
WAN_GUEST_MANAGED_CONFIG = AGENT_CONFIG.replace(
    'ownership = "agent"\n',
    'ownership = "agent"\nmanaged_by = "guest"\nprimary_rule = {driver = "e1000e"}\n',
)

#: Each host's free devices for team wan.
WAN_POOLS: dict[str, list[Nic]] = {
    "hosta": [Nic("52:54:00:cd:0a:01", "ptv-orch-wa1", "ua-orch-wa1")],
    "hostb": [Nic("52:54:00:cd:0b:01", "ptv-orch-wb1", "ua-orch-wb1")],
}

#: Each host's free devices for team lan, as the orchestrator's inventory lists them.
POOLS: dict[str, list[Nic]] = {
    "hosta": [Nic("52:54:00:cc:0a:01", "ptv-orch-a1", "ua-orch-a1")],
    "hostb": [Nic("52:54:00:cc:0b:01", "ptv-orch-b1", "ua-orch-b1")],
}


def configure_agent(lab: VmLab, config: str, timeout: float = 60.0) -> None:
    """Write the guest's /etc/ptmig/agent.toml (as an admin would) and restart the agent."""
    encoded = base64.b64encode(config.encode()).decode()
    lab.exec(
        f"echo {encoded} | base64 -d > /etc/ptmig/agent.toml && "
        "ptmig-agent --check-config --config /etc/ptmig/agent.toml && "
        "systemctl restart ptmig-agent",
        timeout=timeout,
    ).check()


def detach(lab: VmLab, nic: Nic, timeout: float = 30.0) -> float:
    """virDomainDetachDeviceFlags(LIVE) of *nic*, then wait until libvirt has removed it
    (the guest acknowledged the unplug); returns the seconds taken."""
    dom = lab.domain()
    started = time.monotonic()
    dom.detachDeviceFlags(nic.xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)
    while time.monotonic() - started < timeout:
        if nic.alias not in device_aliases(dom.XMLDesc(0)):
            return time.monotonic() - started
        time.sleep(0.02)
    raise LabError(f"{nic.alias} still present {timeout:.0f} s after its detach")


def attach(lab: VmLab, nic: Nic, bus: int) -> None:
    """virDomainAttachDeviceFlags(LIVE) of *nic* into the root port of PCI bus *bus*."""
    attach_at(lab.domain(), nic.xml(), bus, libvirt.VIR_DOMAIN_AFFECT_LIVE)


def attach_at(dom: libvirt.virDomain, device_xml: str, bus: int, flags: int) -> None:
    """virDomainAttachDeviceFlags(*flags*) of *device_xml* into the root port of PCI bus
    *bus* (the emulated and the nested lab alike)."""
    xml = ET.fromstring(device_xml)
    ET.SubElement(
        xml,
        "address",
        {"type": "pci", "domain": "0x0000", "bus": f"0x{bus:02x}", "slot": "0x00"},
        function="0x0",
    )
    dom.attachDeviceFlags(ET.tostring(xml, "unicode"), flags)


def free_bus(dom: libvirt.virDomain, avoid: frozenset[int] = frozenset()) -> int:
    """The highest PCI bus behind a pcie-root-port that no device of *dom* uses now, other
    than *avoid* (the old primary's): the new NIC then sits at another PCI address."""
    root = ET.fromstring(dom.XMLDesc(0))
    ports = {
        int(c.get("index", "0"))
        for c in root.iter("controller")
        if c.get("type") == "pci" and c.get("model") == "pcie-root-port"
    }
    used = {
        int(a.get("bus", "0"), 16)
        for device in _devices(root)
        if device.tag != "controller"
        for a in device.findall("address")
        if a.get("type") == "pci"
    }
    free = sorted(ports - used - avoid)
    if not free:
        raise LabError("no free pcie-root-port left for a hot-plug")
    return free[-1]


def bus_of(dom: libvirt.virDomain, alias: str) -> int:
    """The PCI bus of *dom*'s live device *alias*."""
    root = ET.fromstring(dom.XMLDesc(0))
    for device in _devices(root):
        found = device.find("alias")
        address = device.find("address")
        if found is not None and found.get("name") == alias and address is not None:
            return int(address.get("bus", "0"), 16)
    raise LabError(f"no live device {alias}")


def _devices(domain: ET.Element) -> list[ET.Element]:
    devices = domain.find("devices")
    return list(devices) if devices is not None else []
