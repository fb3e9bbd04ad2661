"""What the workflow reads from a domain's XML, and the persistent XML it sends on.

`parse_domain` reads live or inactive domain XML into a `DomainInfo`: the NICs
and PCI hostdevs (with the guest-side PCI address the agent sees and the host-side
identity that pools track), the agent's virtio-serial channel, the vsock device
and ptmig's team metadata.  Devices ptmig does not know are skipped, not refused:
this module reads every domain on a host to find free pool slots.

Guest PCI addresses are libvirt's (controller index as bus number).  On q35 with
one device per pcie-root-port the guest's firmware numbers buses the same way,
but that is the firmware's choice; the agent should prefer the MAC when it has one.

`strip_primary` removes a team's primary from (persistent) domain XML
with xml.dom.minidom, which, unlike ElementTree, keeps namespace prefixes and
comments as they were, so the rest of the document goes through unchanged.
"""

from __future__ import annotations

import xml.dom.minidom
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from xml.dom.minidom import Element, Text

from ptmig.serial_session import AGENT_CHANNEL

from host.domain.addresses import normalize_mac, pci_from_element
from host.domain.errors import DomainModelError, shown
from host.domain.names import check_alias
from host.domain.teams import TEAMS_NS, PrimaryDevice, TeamSet, teams_from_element
from host.domain.xmltree import parse_xml, split_tag


@dataclass(frozen=True)
class Interface:
    """An ``<interface>``; fields a type does not have are None."""

    type: str
    mac: str | None
    model: str | None
    alias: str | None
    bridge: str | None  # type bridge, or the bridge libvirt reports for a network
    network: str | None  # type network (and type hostdev when a network chose it)
    target_dev: str | None  # the tap, for tap-backed types
    guest_pci_address: str | None
    host_pci_address: str | None  # type hostdev: the VF or NIC on the host


@dataclass(frozen=True)
class Hostdev:
    """A ``<hostdev mode='subsystem' type='pci'>``."""

    alias: str | None
    host_pci_address: str
    guest_pci_address: str | None
    managed: bool


@dataclass(frozen=True)
class AgentChannel:
    """The virtio-serial port ``org.ptmig.agent.0``; `path` is the host socket."""

    path: str | None
    state: str | None  # libvirt's live "connected"/"disconnected", None when inactive


@dataclass(frozen=True)
class Vsock:
    """The ``<vsock>`` device: `cid` is None when libvirt will pick one."""

    cid: int | None
    auto: bool


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    interfaces: tuple[Interface, ...]
    hostdevs: tuple[Hostdev, ...]
    agent_channel: AgentChannel | None
    vsock: Vsock | None
    teams: TeamSet | None  # None: the domain has no ptmig metadata

    def device(self, alias: str) -> Interface | Hostdev | None:
        """The interface or hostdev called `alias`, if any."""
        devices: list[Interface | Hostdev] = [*self.interfaces, *self.hostdevs]
        for device in devices:
            if device.alias == alias:
                return device
        return None


def parse_domain(domain_xml: str) -> DomainInfo:
    """Read `domain_xml` (live or inactive) into a DomainInfo."""
    root = parse_xml(domain_xml, "domain XML")
    if root.tag != "domain":
        raise DomainModelError(f"domain XML: root element is {shown(root.tag)}, not domain")
    name = _text(root, "name")
    if not name:
        raise DomainModelError("domain XML: no <name>")
    where = f"domain {shown(name)}"
    devices = root.find("devices")
    children = list(devices) if devices is not None else []
    interfaces = tuple(_interface(e, where) for e in children if e.tag == "interface")
    hostdevs = tuple(
        _hostdev(e, where)
        for e in children
        if e.tag == "hostdev"
        and e.get("mode", "subsystem") == "subsystem"
        and e.get("type") == "pci"
    )
    channels = [_channel(e) for e in children if e.tag == "channel" and _is_agent_channel(e)]
    vsocks = [_vsock(e, where) for e in children if e.tag == "vsock"]
    return DomainInfo(
        name=name,
        uuid=_text(root, "uuid") or "",
        interfaces=interfaces,
        hostdevs=hostdevs,
        agent_channel=channels[0] if channels else None,
        vsock=vsocks[0] if vsocks else None,
        teams=_teams(root, where),
    )


def device_aliases(domain_xml: str) -> frozenset[str]:
    """The ``<alias name>`` of every device in `domain_xml`, of any kind.

    Whether a device is there is a question for ``<devices>`` alone: the rest of the
    document (ptmig's own metadata among it) may name the alias too.
    """
    root = parse_xml(domain_xml, "domain XML")
    devices = root.find("devices")
    aliases = set()
    for device in list(devices) if devices is not None else []:
        alias = device.find("alias")
        if alias is not None and alias.get("name"):
            aliases.add(str(alias.get("name")))
    return frozenset(aliases)


def strip_primary(domain_xml: str, primary: PrimaryDevice) -> str:
    """`domain_xml` without any device that is `primary`, by alias or host identity.

    The persistent XML sent to a destination must never name the source's
    device: it would fail to start there, or worse, grab another guest's device.
    libvirt-assigned aliases (``hostdev0``) are not in persistent XML, so the
    device is also matched by PCI address, tap or VF network + MAC.
    """
    return _strip(domain_xml, lambda device: _is_primary(device, primary))


def _strip(domain_xml: str, matches: Callable[[Element], bool]) -> str:
    parse_xml(domain_xml, "domain XML")  # refuses DOCTYPEs before minidom sees it
    try:
        document = xml.dom.minidom.parseString(domain_xml.encode("utf-8"))
    except Exception as err:  # pragma: no cover - parse_xml accepted the same bytes
        raise DomainModelError(f"domain XML: {err}") from None
    root = document.documentElement
    if root is None or root.tagName != "domain":
        raise DomainModelError("domain XML: root element is not domain")
    for devices in _dom_children(root, "devices"):
        for device in _dom_children(devices):
            if matches(device):
                previous = device.previousSibling
                if isinstance(previous, Text) and not previous.data.strip():
                    devices.removeChild(previous)
                devices.removeChild(device)
    return str(root.toxml())


def _is_primary(device: Element, primary: PrimaryDevice) -> bool:
    """Whether `device` (a child of ``<devices>``) is `primary`.

    A VF's MAC may be the team's MAC, which may be the standby's, so a VF is
    matched by network *and* MAC; an emulated slot's MAC is per host and unique,
    but is only trusted on a non-virtio NIC, never on a standby.
    """
    if _alias_of(device) == primary.alias:
        return True
    kind = device.tagName
    source_pci = _dom_pci(device)
    if primary.pci_address is not None and source_pci == primary.pci_address:
        return kind == "hostdev" or (
            kind == "interface" and device.getAttribute("type") == "hostdev"
        )
    if kind != "interface":
        return False
    mac = (_dom_attr(device, "mac", "address") or "").lower()
    if primary.kind == "vf-network":
        return _dom_attr(device, "source", "network") == primary.network and mac == primary.mac
    if primary.kind == "emulated":
        if _dom_attr(device, "target", "dev") == primary.tap:
            return True
        return mac == primary.mac and _dom_attr(device, "model", "type") != "virtio"
    return False


def _dom_children(element: Element, name: str | None = None) -> list[Element]:
    return [
        child
        for child in element.childNodes
        if isinstance(child, Element) and (name is None or child.tagName == name)
    ]


def _dom_attr(element: Element, child: str, name: str) -> str | None:
    for found in _dom_children(element, child):
        return str(found.getAttribute(name)) if found.hasAttribute(name) else None
    return None


def _alias_of(device: Element) -> str | None:
    return _dom_attr(device, "alias", "name")


def _dom_pci(device: Element) -> str | None:
    """The host PCI address in a device's ``<source><address type='pci'>``."""
    for source in _dom_children(device, "source"):
        for address in _dom_children(source, "address"):
            element = ET.Element("address", {k: v for k, v in address.attributes.items()})
            try:
                return pci_from_element(element, "device source")
            except DomainModelError:
                return None
    return None


def _interface(element: ET.Element, where: str) -> Interface:
    alias = _alias(element, where)
    where = f"{where}: interface {shown(alias)}"
    mac = _attr(element, "mac", "address")
    source = element.find("source")
    host_pci = None
    if source is not None:
        address = source.find("address")
        if address is not None and address.get("type", "pci") == "pci":
            host_pci = pci_from_element(address, f"{where}: source address")
    return Interface(
        type=element.get("type", ""),
        mac=normalize_mac(mac, f"{where}: mac") if mac is not None else None,
        model=_attr(element, "model", "type"),
        alias=alias,
        bridge=source.get("bridge") if source is not None else None,
        network=source.get("network") if source is not None else None,
        target_dev=_attr(element, "target", "dev"),
        guest_pci_address=_guest_pci(element, where),
        host_pci_address=host_pci,
    )


def _hostdev(element: ET.Element, where: str) -> Hostdev:
    alias = _alias(element, where)
    where = f"{where}: hostdev {shown(alias)}"
    address = element.find("source/address")
    if address is None:
        raise DomainModelError(f"{where}: no <source><address>")
    return Hostdev(
        alias=alias,
        host_pci_address=pci_from_element(address, f"{where}: source address"),
        guest_pci_address=_guest_pci(element, where),
        managed=element.get("managed") == "yes",
    )


def _is_agent_channel(element: ET.Element) -> bool:
    return element.get("type") == "unix" and _attr(element, "target", "name") == AGENT_CHANNEL


def _channel(element: ET.Element) -> AgentChannel:
    return AgentChannel(
        path=_attr(element, "source", "path"), state=_attr(element, "target", "state")
    )


def _vsock(element: ET.Element, where: str) -> Vsock:
    cid = element.find("cid")
    auto = cid is None or cid.get("auto", "no") == "yes"
    raw = cid.get("address") if cid is not None else None
    if raw is None:
        return Vsock(cid=None, auto=auto)
    # isascii: str.isdigit() also takes '³' (which int() refuses) and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or not 3 <= int(raw) <= 0xFFFFFFFE:
        raise DomainModelError(f"{where}: vsock cid {shown(raw)} is not a guest CID")
    return Vsock(cid=int(raw), auto=auto)


def _teams(root: ET.Element, where: str) -> TeamSet | None:
    metadata = root.find("metadata")
    if metadata is None:
        return None
    found = [child for child in metadata if split_tag(child) == (TEAMS_NS, "teams")]
    if not found:
        return None
    if len(found) > 1:
        raise DomainModelError(f"{where}: more than one ptmig teams element in <metadata>")
    return teams_from_element(found[0])


def _guest_pci(element: ET.Element, where: str) -> str | None:
    address = element.find("address")
    if address is None or address.get("type") != "pci":
        return None
    return pci_from_element(address, f"{where}: address")


def _alias(element: ET.Element, where: str) -> str | None:
    alias = _attr(element, "alias", "name")
    return check_alias(alias, f"{where}: alias") if alias is not None else None


def _attr(element: ET.Element, child: str, name: str) -> str | None:
    found = element.find(child)
    return found.get(name) if found is not None else None


def _text(element: ET.Element, child: str) -> str | None:
    found = element.find(child)
    return (found.text or "").strip() if found is not None else None
