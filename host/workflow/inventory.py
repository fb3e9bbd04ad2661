"""A host's pools as the coordinator counts them: the pool networks, each pool's devices
and which of them are free (``ptmig pools``, ``pool-define``'s answer, an evacuation's
plan, preflight's count, the plug's pick).  Free is computed from the host's domains; the
claim is the attach itself.

Why it stays flat as a host fills: a step reads every domain's XML once into a
:class:`DeviceView` (which pool devices each domain holds: `HeldDevices`), and the next
step reads again (the live domains stay the truth; nothing is kept across steps but what
a given XML text holds, which that text alone decides).  A domain whose XML has not
changed since it was last read is not parsed again, and a pool network's XML neither: so
a migration's own work does not grow with the domains already on the destination.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from host.domain.domain_xml import DomainInfo, parse_domain
from host.domain.errors import DomainModelError
from host.domain.pools import (
    POOL_NETWORK_PREFIX,
    DeviceUse,
    EmulatedPool,
    HeldDevices,
    MdevPool,
    MdevSlot,
    PciPool,
    PciSlot,
    Pool,
    Slot,
    VfSlot,
    parse_pool_network,
    pool_network_name,
)
from host.domain.teams import Team
from host.hypervisor import Hypervisor
from host.workflow.errors import WorkflowError
from host.workflow.model import PoolStatus
from host.workflow.observer import PoolUse

log = logging.getLogger(__name__)

#: How many domains' `HeldDevices` are kept, by their XML text (a couple of full hosts'
#: worth: at libvirt's usual 4-10 KB of XML a domain, at most some 20 MB).
HELD_CACHE_SIZE = 2048


@lru_cache(maxsize=HELD_CACHE_SIZE)
def held_devices(domain_xml: str) -> HeldDevices:
    """What the domain whose XML is *domain_xml* holds; parsed once per distinct XML text
    (the answer depends on that text alone, so it cannot go stale).  Keyed by the text
    itself, not a digest: a look-up is a string hash and compare, and no collision can
    answer for another domain."""
    return HeldDevices.of(parse_domain(domain_xml))


@dataclass(frozen=True)
class DeviceView:
    """Which devices the domains of one host hold, read once from libvirt for one step:
    a step that counts several pools, or picks a slot, asks it rather than libvirt; the
    next step reads a new one."""

    uri: str
    use: DeviceUse
    #: Why a domain could not be read: then no count can be trusted, and every one raises.
    error: str | None = None

    @classmethod
    def read(cls, hv: Hypervisor) -> DeviceView:
        """Every domain of *hv*'s host, running or defined (`Hypervisor.all_domain_xml`)."""
        return cls.of(hv.uri, hv.all_domain_xml())

    @classmethod
    def of(cls, uri: str, domains_xml: list[str]) -> DeviceView:
        try:
            return cls(uri, DeviceUse.of([held_devices(xml) for xml in domains_xml]))
        except DomainModelError as exc:
            return cls(uri, DeviceUse(), f"a domain of {uri or 'the host'}: {exc}")

    def free_slots(self, pool: Pool) -> Iterator[Slot]:
        """The slots of *pool* no domain holds, in pool order, made as asked for."""
        if self.error is not None:
            raise DomainModelError(self.error)
        return self.use.free(pool)

    def free(self, pool: Pool | None) -> int:
        """How many devices of *pool* no domain holds (0 for no pool)."""
        if pool is None:
            return 0
        if self.error is not None:
            raise DomainModelError(self.error)
        return self.use.free_count(pool)


@lru_cache(maxsize=256)
def parsed_pool(xml: str) -> Pool:
    """A pool network's XML read into a Pool, once per distinct text (Pools are frozen)."""
    return parse_pool_network(xml)


def pool_networks(hv: Hypervisor) -> Iterator[tuple[str, str]]:
    """(name, XML) of every pool network of *hv*, by name; one gone since the listing is
    left out."""
    for name in sorted(hv.network_names()):
        if name.startswith(POOL_NETWORK_PREFIX) and (xml := hv.network_xml(name)) is not None:
            yield name, xml


def pool_on(hv: Hypervisor, team: Team) -> Pool | None:
    """The team's pool as defined on *hv*'s host, None when that host has none."""
    xml = hv.network_xml(pool_network_name(team.pool))
    if xml is None:
        return None
    try:
        return parsed_pool(xml)
    except DomainModelError as exc:
        raise WorkflowError(f"{hv.uri}: pool {team.pool}: {exc}") from exc


def pool_status(pool: Pool, domains: DeviceView) -> PoolStatus:
    """How many of *pool*'s devices there are and which are free on the host whose
    devices *domains* holds."""
    if isinstance(pool, PciPool):
        total = len(pool.addresses)
    elif isinstance(pool, EmulatedPool):
        total = len(pool.slots)
    elif isinstance(pool, MdevPool):
        total = len(pool.uuids)
    else:
        total = len(pool.vf_addresses)
    try:
        slots = list(domains.free_slots(pool))
    except Exception as exc:
        return PoolStatus(pool.name, pool.kind, total, None, error=str(exc))
    return PoolStatus(
        pool.name, pool.kind, total, len(slots), tuple(d for d in map(_device_of, slots) if d)
    )


def pool_statuses(hv: Hypervisor) -> list[PoolStatus]:
    """Every pool of *hv*, by name; a pool network ptmig cannot read is an error."""
    domains = DeviceView.read(hv)
    return [pool_status(parsed_pool(xml), domains) for _, xml in pool_networks(hv)]


def free_by_pool(hv: Hypervisor) -> dict[str, int]:
    """Free devices per pool on *hv*, read once; a pool network ptmig cannot read is
    left out (logged)."""
    domains = DeviceView.read(hv)
    out = {}
    for name, xml in pool_networks(hv):
        try:
            pool = parsed_pool(xml)
        except Exception as exc:
            log.warning("evacuate: %s: pool network %s unreadable: %s", hv.uri, name, exc)
            continue
        out[pool.name] = pool_status(pool, domains).free or 0
    return out


def _device_of(slot: Slot) -> str:
    """A free slot's device: a PCI address, a tap or an mdev's UUID; "" for a VF (libvirt
    picks which)."""
    if isinstance(slot, VfSlot):
        return ""
    if isinstance(slot, MdevSlot):
        return slot.uuid
    return slot.address if isinstance(slot, PciSlot) else slot.tap


def pool_uses(
    hv: Hypervisor, domains_xml: list[str], infos: list[DomainInfo]
) -> tuple[PoolUse, ...]:
    """Each pool of *hv* with its free devices and the teams of *infos* (the host's domains
    with teams) that name it; empty, with a warning, when the pools cannot be read."""
    using: dict[str, int] = {}
    for info in infos:
        for team in info.teams.teams if info.teams else ():
            using[team.pool] = using.get(team.pool, 0) + 1
    try:
        domains = DeviceView.of(hv.uri, domains_xml)
        statuses = [pool_status(parsed_pool(xml), domains) for _, xml in pool_networks(hv)]
    except Exception as exc:
        log.warning("reconcile %s: cannot read its pools: %s", hv.uri, exc)
        return ()
    return tuple(PoolUse(p.name, p.total, p.free, using.get(p.name, 0)) for p in statuses)
