"""XML of the device ptmig attaches on a destination, one builder per pool kind.

- emulated NIC: ``<interface type='bridge'>`` on the pool's bridge, with the
  slot's tap and per-host MAC;
- non-SR-IOV PCI NIC: ``<hostdev mode='subsystem' type='pci' managed='yes'>``;
- SR-IOV VF: ``<interface type='network'>`` on the pool's hostdev network: libvirt
  picks the VF and programs the MAC we give;
- mediated device: ``<hostdev mode='subsystem' type='mdev' model='vfio-pci'>`` by UUID,
  never a team's primary (an mdev pool's devices travel by state copy), built for the
  lab and the tests that give a domain one.

Every device gets a user alias ``ua-ptmig-<team>-<n>`` (libvirt keeps only aliases
starting with ``ua-``), so that detach, events and the team record all name it.
The option ROM is off by default: it only serves firmware boot, which a
hot-plugged device never sees, and an emulated NIC's ROM is guest RAM whose size
would have to match on every host the guest migrates to.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from host.domain.addresses import normalize_mac, normalize_pci, normalize_uuid
from host.domain.domain_xml import Hostdev, Interface, MdevHostdev
from host.domain.errors import DomainModelError
from host.domain.kinds import PoolKind
from host.domain.names import (
    USER_ALIAS_PREFIX,
    check_ifname,
    check_model,
    check_name,
    check_network_name,
    check_user_alias,
)
from host.domain.pools import EmulatedSlot, MdevSlot, PciSlot, Slot
from host.domain.teams import PrimaryDevice
from host.domain.xmlmodel import build
from host.domain.xmltree import to_text

ALIAS_PREFIX = USER_ALIAS_PREFIX + "ptmig-"


def primary_alias(team: str, number: int) -> str:
    """``ua-ptmig-<team>-<number>``: the alias of the team's `number`-th primary."""
    check_name(team, "team name")
    if not isinstance(number, int) or number < 0:
        raise DomainModelError(f"alias number {number!r} is not a non-negative integer")
    return check_user_alias(f"{ALIAS_PREFIX}{team}-{number}", "primary alias")


def _alias_pattern(team: str) -> re.Pattern[str]:
    return re.compile(re.escape(f"{ALIAS_PREFIX}{check_name(team, 'team name')}-") + r"(\d+)")


def next_primary_alias(team: str, aliases_in_use: Iterable[str | None]) -> str:
    """The team's next alias, one past the highest of its aliases in `aliases_in_use`.

    A fresh alias per attach keeps events of the old device (a late
    DEVICE_REMOVED) from being taken for the new one.
    """
    pattern = _alias_pattern(team)
    numbers = [int(m.group(1)) for a in aliases_in_use if a and (m := pattern.fullmatch(a))]
    return primary_alias(team, max(numbers, default=0) + 1)


def is_primary_alias_of(team: str, alias: str) -> bool:
    """Whether ptmig gave *alias* to a primary it plugged for *team* (``ua-ptmig-lan-3``
    is lan's, not ``lan-b``'s)."""
    return _alias_pattern(team).fullmatch(alias) is not None


def emulated_nic_xml(
    *, alias: str, mac: str, bridge: str, tap: str, model: str = "e1000e", rom: bool = False
) -> str:
    """An emulated NIC on `bridge` with tap `tap`."""
    interface = Interface(
        type="bridge",
        mac=normalize_mac(mac, "emulated NIC mac"),
        bridge=check_ifname(bridge, "emulated NIC bridge"),
        target_dev=check_ifname(tap, "emulated NIC tap"),
        model=check_model(model, "emulated NIC model"),
        rom_enabled=_rom(rom),
        alias=check_user_alias(alias, "device alias"),
    )
    return to_text(build(interface))


def pci_hostdev_xml(*, alias: str, pci_address: str, rom: bool = False) -> str:
    """A managed PCI hostdev: libvirt unbinds it from its host driver and back."""
    hostdev = Hostdev(
        managed=True,
        host_pci_address=normalize_pci(pci_address, "PCI address"),
        rom_enabled=_rom(rom),
        alias=check_user_alias(alias, "device alias"),
    )
    return to_text(build(hostdev))


def vf_interface_xml(*, alias: str, network: str, mac: str) -> str:
    """An interface on a hostdev network; libvirt picks the VF and sets `mac`."""
    interface = Interface(
        type="network",
        mac=normalize_mac(mac, "VF interface mac"),
        network=check_network_name(network, "VF network"),
        alias=check_user_alias(alias, "VF interface alias"),
    )
    return to_text(build(interface))


def vf_hostdev_interface_xml(*, alias: str, pci_address: str, mac: str) -> str:
    """One VF as ``<interface type='hostdev' managed='yes'>``, the form OpenStack Nova
    plugs an SR-IOV port in: libvirt gives the VF `mac` through its PF.  ptmig's own
    pools plug VFs from a hostdev network (`vf_interface_xml`); the lab drives libvirt
    the way Nova does with this one (lab/nested/orchestrated.py)."""
    interface = Interface(
        type="hostdev",
        managed=True,
        mac=normalize_mac(mac, "VF interface mac"),
        host_pci_address=normalize_pci(pci_address, "VF PCI address"),
        alias=check_user_alias(alias, "VF interface alias"),
    )
    return to_text(build(interface))


def mdev_hostdev_xml(*, alias: str, uuid: str) -> str:
    """A mediated device (``/sys/bus/mdev/devices/<uuid>``) as a vfio-pci hostdev."""
    hostdev = MdevHostdev(
        uuid=normalize_uuid(uuid, "mdev uuid"),
        alias=check_user_alias(alias, "device alias"),
    )
    return to_text(build(hostdev))


def _rom(rom: bool) -> str | None:
    return None if rom else "no"


@dataclass(frozen=True)
class Attachment:
    """What to attach for a slot, and the team record to write once it is in."""

    device_xml: str
    primary: PrimaryDevice


def attachment_for_slot(slot: Slot, *, alias: str, vf_mac: str | None = None) -> Attachment:
    """The device XML and PrimaryDevice for plugging `slot` under `alias`.

    `vf_mac` is the MAC libvirt is to give a VF (the team's MAC under policy
    "none"); other slots bring their own MAC (emulated) or the card's (PCI).
    """
    if isinstance(slot, EmulatedSlot):
        xml = emulated_nic_xml(
            alias=alias, mac=slot.mac, bridge=slot.bridge, tap=slot.tap, model=slot.model
        )
        return Attachment(xml, PrimaryDevice(PoolKind.EMULATED, alias, mac=slot.mac, tap=slot.tap))
    if isinstance(slot, PciSlot):
        xml = pci_hostdev_xml(alias=alias, pci_address=slot.address)
        return Attachment(xml, PrimaryDevice(PoolKind.PCI, alias, pci_address=slot.address))
    if isinstance(slot, MdevSlot):
        raise DomainModelError(
            f"pool {slot.pool} holds mediated devices: they are carried by a state copy, "
            "never plugged as a team's primary"
        )
    if vf_mac is None:
        raise DomainModelError(f"pool {slot.pool}: a VF slot needs the MAC to program")
    xml = vf_interface_xml(alias=alias, network=slot.network, mac=vf_mac)
    return Attachment(
        xml, PrimaryDevice(PoolKind.VF_NETWORK, alias, mac=vf_mac, network=slot.network)
    )


def primary_of_device(alias: str, device: Interface | Hostdev) -> PrimaryDevice:
    """The team record of a plugged device (one attached by hand, to be adopted)."""
    if isinstance(device, Hostdev):
        return PrimaryDevice(PoolKind.PCI, alias, pci_address=device.host_pci_address)
    if device.type in ("network", "hostdev") and device.network:
        return PrimaryDevice(PoolKind.VF_NETWORK, alias, mac=device.mac, network=device.network)
    if device.type == "hostdev" and device.host_pci_address:
        return PrimaryDevice(
            PoolKind.PCI, alias, mac=device.mac, pci_address=device.host_pci_address
        )
    return PrimaryDevice(PoolKind.EMULATED, alias, mac=device.mac, tap=device.target_dev)
