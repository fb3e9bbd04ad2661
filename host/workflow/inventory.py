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
import threading
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


class HeldByHost:
    """Per host, what each of its domains holds, by the domain XML text it had at the
    host's last read: a read parses only the texts that host's previous read did not
    have (the answer depends on the text alone, so it cannot go stale), and keeps exactly
    the texts it was given.  So what is kept is the hosts' current domains, never a
    migrated domain's older XML: an earlier cache keyed by every text seen kept up to
    2048 of them, which a long-running ptmigd filled at about 4 texts a migration
    (issue 24's soak: +3 MB over 75 migrations)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_host: dict[str, dict[str, HeldDevices]] = {}

    def of(self, uri: str, domains_xml: list[str]) -> list[HeldDevices]:
        """What each domain of *domains_xml* (host *uri*'s, all of them) holds, in order."""
        with self._lock:
            before = self._by_host.get(uri, {})
        now = {
            xml: before[xml] if xml in before else HeldDevices.of(parse_domain(xml))
            for xml in domains_xml
        }
        with self._lock:  # two steps reading one host at once: either's is the host's
            self._by_host[uri] = now
        return [now[xml] for xml in domains_xml]

    def forget(self) -> None:
        with self._lock:
            self._by_host.clear()


#: The process's one :class:`HeldByHost`: the coordinator's steps, and ptmigd's requests,
#: share what they have read.
HELD = HeldByHost()


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
            return cls(uri, DeviceUse.of(HELD.of(uri, domains_xml)))
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
