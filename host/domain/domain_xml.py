"""What the workflow reads from a domain's XML, and the persistent XML it sends on.

`parse_domain` reads live or inactive domain XML into a `DomainInfo`: the NICs, PCI
hostdevs and mediated devices (with the guest-side PCI address the agent sees and the
host-side identity that pools track: a PCI address, an mdev's UUID) and ptmig's team
metadata.  The agent's channel is opened
by its name (libvirt finds it), so its element is not read here.  Devices ptmig does not
know are skipped, not refused: this module reads every domain on a host to find free
pool slots.

Guest PCI addresses are libvirt's (controller index as bus number).  On q35 with
one device per pcie-root-port the guest's firmware numbers buses the same way,
but that is the firmware's choice; the agent should prefer the MAC when it has one.

`Interface` and `Hostdev` declare where each of their fields lives in the device's
element (host/domain/xmlmodel.py): the same declarations read a domain's devices here
and build the devices ptmig attaches (host/domain/devices.py).

`strip_primary` removes a team's primary from (persistent) domain XML, keeping
the namespace prefixes and comments of the rest of the document as they were;
`retarget_hostdev` gives a hostdev whose state QEMU copies the destination's device (a
PCI address, or an mdev's UUID) in the XML a migration sends.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

from host.domain.addresses import normalize_mac, normalize_uuid
from host.domain.errors import DomainModelError, shown
from host.domain.kinds import PoolKind
from host.domain.names import check_alias
from host.domain.teams import TEAMS_NS, PrimaryDevice, TeamSet, teams_from_element
from host.domain.xmlmodel import (
    GUEST_PCI,
    HOST_PCI,
    SOURCE_PCI,
    at,
    matches,
    read,
    value_at,
    write_field,
)
from host.domain.xmltree import (
    metadata_element,
    parse_xml,
    parse_xml_keeping_prefixes,
    to_text_as_read,
)


def yes(value: str, _where: str) -> bool:
    """An attribute's ``yes`` as True, anything else as False."""
    return value == "yes"


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


@dataclass(frozen=True)
class Interface:
    """An ``<interface>``; fields a type does not have are None.  Declared in the order
    ptmig writes them: ``<mac>``, ``<source>``, ``<target>``, ``<model>``, ``<rom>``,
    ``<alias>``."""

    XML_TAG: ClassVar[str] = "interface"
    XML_LABEL: ClassVar[str] = "alias"

    type: str = at("@type", default="")
    #: type hostdev: libvirt detaches the device from its host driver and back
    managed: bool | None = at("@managed", default=None, check=yes, show=yes_no)
    mac: str | None = at("mac/@address", default=None, check=normalize_mac)
    bridge: str | None = at("source/@bridge", default=None)  # or the bridge of a network
    network: str | None = at("source/@network", default=None)  # type network (and hostdev)
    target_dev: str | None = at("target/@dev", default=None)  # the tap, for tap-backed types
    model: str | None = at("model/@type", default=None)
    rom_enabled: str | None = at("rom/@enabled", default=None)
    alias: str | None = at("alias/@name", default=None, check=check_alias)
    guest_pci_address: str | None = at("address", default=None, codec=GUEST_PCI)
    #: type hostdev: the VF or NIC on the host
    host_pci_address: str | None = at("source/address", default=None, codec=SOURCE_PCI)


@dataclass(frozen=True)
class Hostdev:
    """A ``<hostdev mode='subsystem' type='pci'>``."""

    XML_TAG: ClassVar[str] = "hostdev"
    XML_LABEL: ClassVar[str] = "alias"
    XML_FIXED: ClassVar[dict[str, str]] = {"@mode": "subsystem", "@type": "pci"}
    XML_IMPLIED: ClassVar[dict[str, str]] = {"@mode": "subsystem"}

    host_pci_address: str = at("source/address", codec=HOST_PCI)
    managed: bool = at("@managed", default=False, check=yes, show=yes_no)
    rom_enabled: str | None = at("rom/@enabled", default=None)
    alias: str | None = at("alias/@name", default=None, check=check_alias)
    guest_pci_address: str | None = at("address", default=None, codec=GUEST_PCI)


@dataclass(frozen=True)
class MdevHostdev:
    """A ``<hostdev mode='subsystem' type='mdev' model='vfio-pci'>``: a mediated device
    (``/sys/bus/mdev/devices/<uuid>``, e.g. the kernel's ``mtty`` sample), known on its
    host by its UUID alone; libvirt finds its parent and type from sysfs."""

    XML_TAG: ClassVar[str] = "hostdev"
    XML_LABEL: ClassVar[str] = "alias"
    XML_FIXED: ClassVar[dict[str, str]] = {"@mode": "subsystem", "@type": "mdev"}
    XML_IMPLIED: ClassVar[dict[str, str]] = {"@mode": "subsystem"}

    uuid: str = at("source/address/@uuid", check=normalize_uuid)
    #: vfio-pci, vfio-ccw or vfio-ap (libvirt's schema requires one)
    model: str = at("@model", default="vfio-pci")
    alias: str | None = at("alias/@name", default=None, check=check_alias)
    guest_pci_address: str | None = at("address", default=None, codec=GUEST_PCI)


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str
    interfaces: tuple[Interface, ...]
    hostdevs: tuple[Hostdev, ...]
    teams: TeamSet | None  # None: the domain has no ptmig metadata
    mdevs: tuple[MdevHostdev, ...] = ()

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
    interfaces = tuple(read(Interface, e, where) for e in children if e.tag == "interface")
    hostdevs = tuple(
        read(Hostdev, e, where) for e in children if e.tag == "hostdev" and matches(Hostdev, e)
    )
    mdevs = tuple(
        read(MdevHostdev, e, where)
        for e in children
        if e.tag == "hostdev" and matches(MdevHostdev, e)
    )
    return DomainInfo(
        name=name,
        uuid=_text(root, "uuid") or "",
        interfaces=interfaces,
        hostdevs=hostdevs,
        teams=_teams(root, where),
        mdevs=mdevs,
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
    root, prefixes = parse_xml_keeping_prefixes(domain_xml, "domain XML")
    if root.tag != "domain":
        raise DomainModelError("domain XML: root element is not domain")
    for devices in root.findall("devices"):
        previous: ET.Element | None = None
        for device in list(devices):
            if isinstance(device.tag, str) and _is_primary(device, primary):
                # The whitespace after the device is what followed the one before it.
                if previous is not None:
                    previous.tail = device.tail
                else:
                    devices.text = device.tail
                devices.remove(device)
            else:
                previous = device
    return to_text_as_read(root, prefixes)


def retarget_hostdev(domain_xml: str, moves: Mapping[str, str], *, strict: bool = True) -> str:
    """`domain_xml` with each hostdev whose host identity is a key of `moves` given the
    value instead: a PCI hostdev's host address, or a mediated device's UUID.  This is the
    destination's device for a device whose state QEMU copies (libvirt migrates onto
    whatever the destination XML names, as Nova's ``_update_mdev_xml`` and its PCI
    counterpart do).  Everything else, the guest address and alias among it, stays as it
    was.  `strict`: a key of `moves` the XML has no hostdev for is an error (a persistent
    definition may lack a device plugged live only)."""
    root, prefixes = parse_xml_keeping_prefixes(domain_xml, "domain XML")
    if root.tag != "domain":
        raise DomainModelError("domain XML: root element is not domain")
    left = dict(moves)
    for element in root.iterfind("devices/hostdev"):
        if matches(Hostdev, element):
            address = read(Hostdev, element, "hostdev").host_pci_address
            if address in left:
                write_field(Hostdev, element, "host_pci_address", left.pop(address))
        elif matches(MdevHostdev, element):
            uuid = read(MdevHostdev, element, "hostdev").uuid
            if uuid in left:
                write_field(MdevHostdev, element, "uuid", left.pop(uuid))
    if left and strict:
        raise DomainModelError(f"domain XML: no hostdev at {', '.join(sorted(left))}")
    return to_text_as_read(root, prefixes)


def _is_primary(element: ET.Element, primary: PrimaryDevice) -> bool:
    """Whether `element` (a child of ``<devices>``) is `primary`.

    A VF's MAC may be the team's MAC, which may be the standby's, so a VF is
    matched by network *and* MAC; an emulated slot's MAC is per host and unique,
    but is only trusted on a non-virtio NIC, never on a standby.  A device ptmig
    cannot read is matched by its alias alone.
    """
    if value_at(element, "alias/@name") == primary.alias:
        return True
    device: Interface | Hostdev
    try:
        if element.tag == "interface":
            device = read(Interface, element, "device")
        elif element.tag == "hostdev" and matches(Hostdev, element):
            device = read(Hostdev, element, "device")
        else:
            return False
    except DomainModelError:
        return False
    if primary.pci_address is not None and device.host_pci_address == primary.pci_address:
        return isinstance(device, Hostdev) or device.type == "hostdev"
    if not isinstance(device, Interface):
        return False
    if primary.kind is PoolKind.VF_NETWORK:
        return device.network == primary.network and device.mac == primary.mac
    if primary.kind is PoolKind.EMULATED:
        if device.target_dev == primary.tap:
            return True
        return device.mac == primary.mac and device.model != "virtio"
    return False


def _teams(root: ET.Element, where: str) -> TeamSet | None:
    found = metadata_element(root, TEAMS_NS, "teams", where, "ptmig teams element")
    return teams_from_element(found) if found is not None else None


def _text(element: ET.Element, child: str) -> str | None:
    found = element.find(child)
    return (found.text or "").strip() if found is not None else None
