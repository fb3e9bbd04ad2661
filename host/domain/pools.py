"""Device pools of one host, defined as libvirt networks named ``ptmig-pool-<name>``.

Pool definitions live in each host's libvirt, so that everything one host needs to
know about another goes through libvirt and nothing else: the same pool name on
two hosts names each host's own devices.

- `VfNetworkPool`: a real ``<forward mode='hostdev' managed='yes'>`` network,
  with a ``<pf dev=.../>`` or a list of VF ``<address type='pci'/>`` (libvirt
  keeps one or the other in a definition).  A domain attaches ``<interface
  type='network'>`` and libvirt picks a free VF and programs its MAC.  An active
  network defined by PF lists the PF and its VFs; an inactive one lists no VFs,
  and its capacity is unknown until it is started.
- `PciPool`: the PCI addresses of non-SR-IOV NICs the host admin opted in.
- `EmulatedPool` (the lab): a bridge, a NIC model and slots, each a tap name and
  a MAC that differs per host, like a card whose MAC is burned in.
- `MdevPool`: mediated devices of one type (``mtty-2``) by UUID, made beforehand on the
  host (``mdevctl``, or ``echo UUID > .../mdev_supported_types/TYPE/create``).  They are
  no team's primary: a domain holding one has it carried by QEMU's state copy onto a
  free one of the destination's pool of the same name (host/workflow/hybrid.py).

The last three are inert network definitions (never started, no ``<forward>``)
that carry the pool in the network's ``<metadata>``, namespace POOL_NS::

    <network>
      <name>ptmig-pool-lab</name>
      <metadata>
        <ptmig:pool xmlns:ptmig="https://ptmig.dev/xmlns/pool/1" kind="emulated"
                    bridge="ptmigbr0" model="e1000e">
          <slot tap="ptmig-lab-0" mac="52:54:00:a0:00:01"/>
        </ptmig:pool>
      </metadata>
    </network>

`free_slots` is pure: it says what is free given the XML of every domain on the
host.  Two coordinators may read the same answer and pick the same slot; the
claim itself is the attach, which libvirt makes atomic: a managed PCI hostdev
already assigned to a domain is refused ("PCI device ... is in use by driver
QEMU, domain ..."), so is an mdev another domain holds (for a state-copied one
the claim is the migration: the destination's QEMU opens it or the migration
fails), a tap name that exists and is in use cannot be opened a second
time, and a hostdev network hands each VF to one interface only.  The loser of
such a race sees an attach error, re-reads, and picks again; nothing here locks.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from typing import Any, ClassVar

from host.domain.addresses import normalize_mac, normalize_pci, normalize_uuid
from host.domain.domain_xml import (
    DomainInfo,
    Hostdev,
    Interface,
    MdevHostdev,
    parse_domain,
    yes,
    yes_no,
)
from host.domain.errors import DomainModelError, shown
from host.domain.kinds import PoolKind as PoolKind  # where most callers look for it
from host.domain.names import check_ifname, check_mdev_type, check_model, check_name
from host.domain.xmlmodel import PCI, Codec, at, build, child, each, read, value_at
from host.domain.xmltree import parse_xml, split_tag, to_text

POOL_NS = "https://ptmig.dev/xmlns/pool/1"
POOL_NS_PREFIX = "ptmig"  # the XML namespace prefix of POOL_NS
POOL_NETWORK_PREFIX = "ptmig-pool-"
MAX_POOL_XML_CHARS = 1024 * 1024
MAX_POOL_ENTRIES = 4096  # a PF has at most 256 VFs on today's cards; be generous


def pool_network_name(pool: str) -> str:
    """The libvirt network that defines pool `pool`."""
    return POOL_NETWORK_PREFIX + check_name(pool, "pool name")


class _PoolName:
    """A network's ``<name>``, ``ptmig-pool-<pool>``, as the pool's name."""

    def read(self, element: ET.Element, where: str) -> object:
        network = (element.text or "").strip()
        if not network.startswith(POOL_NETWORK_PREFIX):
            raise DomainModelError(
                f"network {shown(network)} is not a ptmig pool (want {POOL_NETWORK_PREFIX}<name>)"
            )
        return check_name(network[len(POOL_NETWORK_PREFIX) :], f"network {shown(network)}")

    def write(self, value: Any, element: ET.Element) -> None:
        element.text = pool_network_name(str(value))


_NAME: Codec = _PoolName()
_META = "metadata/ptmig:pool"  # where ptmig keeps a pool in its network


class _PoolNetwork:
    """What every pool's network has: its element, ptmig's namespace, children's order."""

    XML_TAG: ClassVar[str] = "network"
    XML_NS: ClassVar[dict[str, str]] = {POOL_NS_PREFIX: POOL_NS}
    XML_ORDER: ClassVar[tuple[str, ...]] = ("name", "metadata", "forward")


@dataclass(frozen=True)
class VfNetworkPool(_PoolNetwork):
    kind: ClassVar[PoolKind] = PoolKind.VF_NETWORK
    XML_FIXED: ClassVar[dict[str, str]] = {
        f"{_META}/@kind": PoolKind.VF_NETWORK.value,
        "forward/@mode": "hostdev",
        "forward/@managed": "yes",
    }
    XML_STRICT: ClassVar[tuple[str, ...]] = (_META,)

    name: str = at("name", codec=_NAME)
    pf_dev: str | None = at("forward/pf/@dev", default=None)
    vf_addresses: tuple[str, ...] = each("forward/address", codec=PCI, limit=MAX_POOL_ENTRIES)

    def __post_init__(self) -> None:
        check_name(self.name, "pool name")
        where = f"pool {self.name}"
        if self.pf_dev is not None:
            check_ifname(self.pf_dev, f"{where}: pf dev")
        vfs = tuple(normalize_pci(a, f"{where}: VF address") for a in self.vf_addresses)
        object.__setattr__(self, "vf_addresses", _unique(vfs, f"{where}: VF address"))
        if self.pf_dev is None and not self.vf_addresses:
            raise DomainModelError(f"{where}: a VF network needs a pf dev or VF addresses")

    @property
    def network(self) -> str:
        return pool_network_name(self.name)


@dataclass(frozen=True)
class PciPool(_PoolNetwork):
    kind: ClassVar[PoolKind] = PoolKind.PCI
    XML_FIXED: ClassVar[dict[str, str]] = {f"{_META}/@kind": PoolKind.PCI.value}
    XML_STRICT: ClassVar[tuple[str, ...]] = (_META, f"{_META}/device")

    name: str = at("name", codec=_NAME)
    addresses: tuple[str, ...] = each(f"{_META}/device/@address", limit=MAX_POOL_ENTRIES)
    #: The operator's word that these devices' drivers implement VFIO migration (both
    #: hosts' pools must say so): a team on one may stay plugged while QEMU copies the
    #: device's state (host/workflow/hybrid.py).  Unset: never (Nova's live_migratable).
    state_copy: bool | None = at(f"{_META}/@state-copy", default=None, check=yes, show=yes_no)

    def __post_init__(self) -> None:
        check_name(self.name, "pool name")
        where = f"pool {self.name}"
        addresses = tuple(normalize_pci(a, f"{where}: device address") for a in self.addresses)
        object.__setattr__(self, "addresses", _unique(addresses, f"{where}: device address"))

    @property
    def network(self) -> str:
        return pool_network_name(self.name)


@dataclass(frozen=True)
class TapSlot:
    """One emulated NIC an emulated pool can plug: its tap and its per-host MAC."""

    XML_TAG: ClassVar[str] = "slot"
    XML_STRICT: ClassVar[tuple[str, ...]] = (".",)

    tap: str = at("@tap")
    mac: str = at("@mac", default="")

    def __post_init__(self) -> None:
        check_ifname(self.tap, "slot tap")
        object.__setattr__(self, "mac", normalize_mac(self.mac, f"slot {self.tap}: mac"))


@dataclass(frozen=True)
class EmulatedPool(_PoolNetwork):
    kind: ClassVar[PoolKind] = PoolKind.EMULATED
    XML_FIXED: ClassVar[dict[str, str]] = {f"{_META}/@kind": PoolKind.EMULATED.value}
    XML_STRICT: ClassVar[tuple[str, ...]] = (_META,)

    name: str = at("name", codec=_NAME)
    bridge: str = at(f"{_META}/@bridge", default="")
    model: str = at(f"{_META}/@model", default="")
    slots: tuple[TapSlot, ...] = child(f"{_META}/slot", TapSlot, many=True, limit=MAX_POOL_ENTRIES)

    def __post_init__(self) -> None:
        check_name(self.name, "pool name")
        where = f"pool {self.name}"
        check_ifname(self.bridge, f"{where}: bridge")
        check_model(self.model, f"{where}: model")
        object.__setattr__(self, "slots", tuple(self.slots))
        _unique(tuple(s.tap for s in self.slots), f"{where}: slot tap")
        _unique(tuple(s.mac for s in self.slots), f"{where}: slot mac")

    @property
    def network(self) -> str:
        return pool_network_name(self.name)


@dataclass(frozen=True)
class MdevPool(_PoolNetwork):
    """Mediated devices of one type, by UUID.  One type per pool: libvirt migrates an mdev
    only onto one of the same type (its vendor driver checks the state stream, mtty the
    number of ports), so a pool's name on two hosts must name the same type there too."""

    kind: ClassVar[PoolKind] = PoolKind.MDEV
    XML_FIXED: ClassVar[dict[str, str]] = {f"{_META}/@kind": PoolKind.MDEV.value}
    XML_STRICT: ClassVar[tuple[str, ...]] = (_META, f"{_META}/mdev")

    name: str = at("name", codec=_NAME)
    mdev_type: str = at(f"{_META}/@type", check=check_mdev_type)
    uuids: tuple[str, ...] = each(
        f"{_META}/mdev/@uuid", check=normalize_uuid, limit=MAX_POOL_ENTRIES
    )
    #: As a pci pool's: the operator's word that this type's vendor driver implements
    #: VFIO migration (mtty does since Linux 6.7).  Unset: a domain holding one of these
    #: is not migrated (an mdev has no standby to switch to).
    state_copy: bool | None = at(f"{_META}/@state-copy", default=None, check=yes, show=yes_no)

    def __post_init__(self) -> None:
        check_name(self.name, "pool name")
        where = f"pool {self.name}"
        check_mdev_type(self.mdev_type, f"{where}: mdev type")
        uuids = tuple(normalize_uuid(u, f"{where}: mdev uuid") for u in self.uuids)
        object.__setattr__(self, "uuids", _unique(uuids, f"{where}: mdev uuid"))

    @property
    def network(self) -> str:
        return pool_network_name(self.name)


Pool = VfNetworkPool | PciPool | EmulatedPool | MdevPool


@dataclass(frozen=True)
class VfSlot:
    """Room for one more VF interface on `network`; libvirt picks which VF."""

    pool: str
    network: str


@dataclass(frozen=True)
class PciSlot:
    pool: str
    address: str


@dataclass(frozen=True)
class EmulatedSlot:
    pool: str
    bridge: str
    model: str
    tap: str
    mac: str


@dataclass(frozen=True)
class MdevSlot:
    pool: str
    uuid: str
    mdev_type: str


Slot = VfSlot | PciSlot | EmulatedSlot | MdevSlot


def make_pool(
    name: str,
    kind: str,
    *,
    bridge: str = "",
    model: str = "",
    slots: Iterable[TapSlot] = (),
    addresses: Iterable[str] = (),
    pf: str = "",
    vf_addresses: Iterable[str] = (),
    state_copy: bool = False,
    mdev_type: str = "",
    mdev_uuids: Iterable[str] = (),
) -> Pool:
    """A pool from what a face was given; fields of another kind must be empty."""
    try:
        pool_kind = PoolKind(kind)
    except ValueError:
        raise DomainModelError(
            f"pool {shown(name)}: unknown kind {shown(kind)} (want one of {', '.join(PoolKind)})"
        ) from None
    given = {
        "bridge": bool(bridge),
        "model": bool(model),
        "slots": bool(tuple(slots := tuple(slots))),
        "addresses": bool(addresses := tuple(addresses)),
        "pf": bool(pf),
        "vf addresses": bool(vf_addresses := tuple(vf_addresses)),
        "state copy": state_copy,
        "mdev type": bool(mdev_type),
        "mdev uuids": bool(mdev_uuids := tuple(mdev_uuids)),
    }
    belongs = {
        PoolKind.EMULATED: {"bridge", "model", "slots"},
        PoolKind.PCI: {"addresses", "state copy"},
        PoolKind.VF_NETWORK: {"pf", "vf addresses"},
        PoolKind.MDEV: {"mdev type", "mdev uuids", "state copy"},
    }[pool_kind]
    stray = [field for field, present in given.items() if present and field not in belongs]
    if stray:
        raise DomainModelError(f"pool {shown(name)}: a {kind} pool has no {', '.join(stray)}")
    if pool_kind is PoolKind.EMULATED:
        if not bridge:
            raise DomainModelError(f"pool {shown(name)}: an emulated pool needs a bridge")
        return EmulatedPool(name, bridge, model or "e1000e", slots)
    if pool_kind is PoolKind.PCI:
        return PciPool(name, addresses, state_copy=state_copy or None)
    if pool_kind is PoolKind.MDEV:
        if not mdev_type:
            raise DomainModelError(f"pool {shown(name)}: an mdev pool needs its mdev type")
        return MdevPool(name, mdev_type, mdev_uuids, state_copy=state_copy or None)
    return VfNetworkPool(name, pf_dev=pf or None, vf_addresses=vf_addresses)


#: The kinds kept in an inert network's metadata.
_INERT: dict[PoolKind, type[PciPool | EmulatedPool | MdevPool]] = {
    PoolKind.PCI: PciPool,
    PoolKind.EMULATED: EmulatedPool,
    PoolKind.MDEV: MdevPool,
}


def parse_pool_network(xml: str) -> Pool:
    """Read a ``ptmig-pool-*`` network's XML (inactive or live) into a Pool."""
    root = parse_xml(xml, "pool network XML", max_chars=MAX_POOL_XML_CHARS)
    if root.tag != "network":
        raise DomainModelError(f"pool network XML: root element is {shown(root.tag)}")
    name_element = root.find("name")
    name = _NAME.read(name_element if name_element is not None else ET.Element("name"), "")
    where = f"pool {name}"
    metadata = root.find("metadata")
    found = [
        c for c in (metadata if metadata is not None else []) if split_tag(c) == (POOL_NS, "pool")
    ]
    if len(found) > 1:
        raise DomainModelError(f"{where}: more than one ptmig pool element in <metadata>")
    namespaces = {POOL_NS_PREFIX: POOL_NS}
    kind = value_at(root, f"{_META}/@kind", namespaces)
    mode = value_at(root, "forward/@mode")
    if kind is None and mode == "hostdev":
        kind = PoolKind.VF_NETWORK
    cls: type[Pool]
    if kind == PoolKind.VF_NETWORK:
        if mode != "hostdev":
            raise DomainModelError(f"{where}: a VF pool needs <forward mode='hostdev'>")
        cls = VfNetworkPool
    elif kind in _INERT and found:
        if root.find("forward") is not None:
            raise DomainModelError(f"{where}: a {kind} pool network must be inert (no <forward>)")
        cls = _INERT[PoolKind(kind)]
    else:
        raise DomainModelError(f"{where}: unknown pool kind {shown(kind)}")
    return read(cls, root, where)


def format_pool_network(pool: Pool) -> str:
    """The network XML that defines `pool` (for networkDefineXML).

    A VF pool with a PF is written with the PF alone, even when VF addresses were
    read from a live network: libvirt would drop the PF next to an address list.
    """
    if isinstance(pool, VfNetworkPool) and pool.pf_dev is not None:
        pool = dataclasses.replace(pool, vf_addresses=())
    return to_text(build(pool))


@dataclass(frozen=True)
class HeldDevices:
    """What one domain holds that a pool counts as taken: the device-only view of a
    domain, small enough to keep for every domain of a host (host/workflow/inventory.py
    keeps it per domain XML, so a domain unchanged since the last step is not parsed
    again)."""

    pci: frozenset[str] = frozenset()  # hostdevs' and interfaces' host PCI sources
    taps: frozenset[str] = frozenset()  # interfaces' target devs
    macs: frozenset[str] = frozenset()  # interfaces' MACs
    #: (host PCI source or None, network) of each interface on a network: a VF network's
    #: user whose VF its (inactive) XML does not name still takes one VF.
    networked: tuple[tuple[str | None, str], ...] = ()
    mdevs: frozenset[str] = frozenset()  # mdev hostdevs' UUIDs

    @classmethod
    def of(cls, domain: DomainInfo) -> HeldDevices:
        interfaces = domain.interfaces
        return cls(
            frozenset(h.host_pci_address for h in domain.hostdevs)
            | frozenset(i.host_pci_address for i in interfaces if i.host_pci_address),
            frozenset(i.target_dev for i in interfaces if i.target_dev),
            frozenset(i.mac for i in interfaces if i.mac),
            tuple((i.host_pci_address, i.network) for i in interfaces if i.network),
            frozenset(m.uuid for m in domain.mdevs),
        )


@dataclass(frozen=True)
class DeviceUse:
    """What the domains of one host hold, together (`HeldDevices` of every domain)."""

    pci: frozenset[str] = frozenset()
    taps: frozenset[str] = frozenset()
    macs: frozenset[str] = frozenset()
    networked: tuple[tuple[str | None, str], ...] = ()
    mdevs: frozenset[str] = frozenset()

    @classmethod
    def of(cls, domains: Iterable[HeldDevices]) -> DeviceUse:
        held = tuple(domains)
        return cls(
            frozenset().union(*(h.pci for h in held)),
            frozenset().union(*(h.taps for h in held)),
            frozenset().union(*(h.macs for h in held)),
            tuple(chain.from_iterable(h.networked for h in held)),
            frozenset().union(*(h.mdevs for h in held)),
        )

    def free(self, pool: Pool) -> Iterator[Slot]:
        """The slots of *pool* no domain holds, in pool order (see `free_slots`), made as
        they are asked for: a plug takes the first that its attach gets."""
        if isinstance(pool, MdevPool):
            return (
                MdevSlot(pool.name, u, pool.mdev_type) for u in pool.uuids if u not in self.mdevs
            )
        if isinstance(pool, PciPool):
            return (PciSlot(pool.name, a) for a in pool.addresses if a not in self.pci)
        if isinstance(pool, EmulatedPool):
            return (
                EmulatedSlot(pool.name, pool.bridge, pool.model, s.tap, s.mac)
                for s in pool.slots
                if s.tap not in self.taps and s.mac not in self.macs
            )
        return iter([VfSlot(pool.name, pool.network)] * vf_capacity(pool, self))

    def free_count(self, pool: Pool) -> int:
        """How many slots of *pool* no domain holds (`free` without making the slots)."""
        if isinstance(pool, MdevPool):
            return sum(1 for u in pool.uuids if u not in self.mdevs)
        if isinstance(pool, PciPool):
            return sum(1 for a in pool.addresses if a not in self.pci)
        if isinstance(pool, EmulatedPool):
            return sum(1 for s in pool.slots if s.tap not in self.taps and s.mac not in self.macs)
        return vf_capacity(pool, self)


def free_slots(pool: Pool, domains_xml: Iterable[str]) -> list[Slot]:
    """The slots of `pool` no domain uses, in pool order.

    `domains_xml` is the XML of every domain on the host: live XML of running
    ones and inactive XML of defined ones, since a defined domain that names a
    device would fail to start (or take it) later.  Taken is: a PCI address in any
    hostdev's or hostdev interface's source; a tap in any interface's target dev or
    a slot MAC on any interface.  A VF network's free count is its VFs minus the
    interfaces using it (by VF address when libvirt reports it, else by network).  An
    mdev is taken by any domain's mdev hostdev of its UUID.
    """
    return list(DeviceUse.of(HeldDevices.of(parse_domain(xml)) for xml in domains_xml).free(pool))


def is_pool_device(pool: Pool, device: Interface | Hostdev | MdevHostdev) -> bool:
    """Whether `device` (of a domain on the pool's host) is one of `pool`'s devices, by
    the same identity `free_slots` counts as taken."""
    if isinstance(pool, MdevPool) or isinstance(device, MdevHostdev):
        return (
            isinstance(pool, MdevPool)
            and isinstance(device, MdevHostdev)
            and (device.uuid in pool.uuids)
        )
    if isinstance(pool, PciPool):
        return device.host_pci_address in pool.addresses
    if isinstance(pool, EmulatedPool):
        return (
            isinstance(device, Interface)
            and device.model != "virtio"
            and any(device.target_dev == s.tap or device.mac == s.mac for s in pool.slots)
        )
    if device.host_pci_address is not None and device.host_pci_address in pool.vf_addresses:
        return True
    return isinstance(device, Interface) and device.network == pool.network


def vf_capacity(pool: VfNetworkPool, use: DeviceUse) -> int:
    """How many more interfaces `pool`'s network can take, given what the host's domains
    hold."""
    if not pool.vf_addresses:
        raise DomainModelError(
            f"pool {pool.name}: the network lists no VFs; read the active network's XML "
            "(libvirt lists a PF's VFs once the network is started)"
        )
    vfs = set(pool.vf_addresses)
    # Users whose VF is not in the XML (inactive XML) take one each.
    unplaced = sum(1 for pci, net in use.networked if pci not in vfs and net == pool.network)
    return max(0, len(vfs) - len(use.pci & vfs) - unplaced)


def _unique(values: tuple[str, ...], where: str) -> tuple[str, ...]:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise DomainModelError(f"{where} {value} is listed twice")
        seen.add(value)
    return values
