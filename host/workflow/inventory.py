"""A host's pools as the coordinator counts them: the pool networks, each pool's devices
and which of them are free (``ptmig pools``, ``pool-define``'s answer, an evacuation's
plan).  Free is computed from the host's domains; the claim is the attach itself."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from host.domain.domain_xml import DomainInfo
from host.domain.errors import DomainModelError
from host.domain.pools import (
    POOL_NETWORK_PREFIX,
    EmulatedPool,
    MdevPool,
    MdevSlot,
    PciPool,
    PciSlot,
    Pool,
    Slot,
    VfSlot,
    free_slots,
    parse_pool_network,
    pool_network_name,
)
from host.domain.teams import Team
from host.hypervisor import Hypervisor
from host.workflow.errors import WorkflowError
from host.workflow.model import PoolStatus
from host.workflow.observer import PoolUse

log = logging.getLogger(__name__)


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
        return parse_pool_network(xml)
    except DomainModelError as exc:
        raise WorkflowError(f"{hv.uri}: pool {team.pool}: {exc}") from exc


def free_devices(hv: Hypervisor, pool: Pool | None) -> int:
    """How many devices of *pool* no domain on *hv*'s host uses (0 for no pool)."""
    return 0 if pool is None else len(free_slots(pool, hv.all_domain_xml()))


def pool_status(pool: Pool, domains_xml: list[str]) -> PoolStatus:
    """How many of *pool*'s devices there are and which are free on the host whose
    domains' XML *domains_xml* is."""
    if isinstance(pool, PciPool):
        total = len(pool.addresses)
    elif isinstance(pool, EmulatedPool):
        total = len(pool.slots)
    elif isinstance(pool, MdevPool):
        total = len(pool.uuids)
    else:
        total = len(pool.vf_addresses)
    try:
        slots = free_slots(pool, domains_xml)
    except Exception as exc:
        return PoolStatus(pool.name, pool.kind, total, None, error=str(exc))
    return PoolStatus(
        pool.name, pool.kind, total, len(slots), tuple(d for d in map(_device_of, slots) if d)
    )


def pool_statuses(hv: Hypervisor) -> list[PoolStatus]:
    """Every pool of *hv*, by name; a pool network ptmig cannot read is an error."""
    domains = hv.all_domain_xml()
    return [pool_status(parse_pool_network(xml), domains) for _, xml in pool_networks(hv)]


def free_by_pool(hv: Hypervisor) -> dict[str, int]:
    """Free devices per pool on *hv*, read once; a pool network ptmig cannot read is
    left out (logged)."""
    domains = hv.all_domain_xml()
    out = {}
    for name, xml in pool_networks(hv):
        try:
            pool = parse_pool_network(xml)
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
        statuses = [
            pool_status(parse_pool_network(xml), domains_xml) for _, xml in pool_networks(hv)
        ]
    except Exception as exc:
        log.warning("reconcile %s: cannot read its pools: %s", hv.uri, exc)
        return ()
    return tuple(PoolUse(p.name, p.total, p.free, using.get(p.name, 0)) for p in statuses)
