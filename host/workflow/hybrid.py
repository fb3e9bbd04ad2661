"""The hybrid migration: per team, copy the primary's state or switch to the standby.

A VFIO device whose kernel driver implements the VFIO migration interface (mlx5 and
virtio-net VFs, the ``mtty`` sample) can stay plugged through a live migration: QEMU
copies its state and the guest never leaves its fast path.  Every other primary is
switched to the standby and unplugged, as ptmig always does.  This module decides which
way each team goes, and why; the workflow (host/workflow/migration.py) acts on it.

A team stays plugged (:attr:`Way.COPY`) only when all of these hold, else it switches:

- the operator did not force the switch, for every team (``ptmig migrate --switch-all``)
  or for this one (``--switch TEAM``, repeated; ``MigrateRequest.switch_teams``);
- its primary is a PCI hostdev of a ``pci`` pool that says ``state-copy='yes'`` on
  both hosts: the operator's word, as Nova's ``live_migratable`` tag, since libvirt's XML
  says nothing about it and the device's own answer is not visible through libvirt;
- QEMU names no blocker for it (``query-migrate``'s ``blocked-reasons``), and no blocker
  is left that names none of the primaries about to be unplugged (a vIOMMU, another
  device): such a blocker holds the whole VM;
- the destination's pool has a free device for it, which is then written into the
  destination's XML in place of the source's (libvirt migrates onto it).

Blocker strings are free text: one names a device by its QEMU id (libvirt's alias) or its
host address.  "No blocker" alone is not trusted (vfio-user devices add none yet copy no
state), which is why the pool's word is needed too.  After the switched primaries are
unplugged, QEMU is asked again (:func:`still_blocked`): any blocker left means the kept
ones are switched and unplugged too, before the migration starts.

**Mediated devices are passengers, not primaries.**  The lab's migratable device is the
kernel's ``mtty`` sample, a mediated device (``<hostdev type='mdev'>`` by UUID): an
emulated UART, not a NIC.  It cannot be a bond member (the agent binds NICs found by MAC
or PCI address; a serial port has neither a MAC nor a link), and no upstream NIC driver
offers mdevs (mlx5's mdev sub-functions and Intel's Scalable IOV never landed; SFs went to
the auxiliary bus).  So an mdev is modelled as what it is to the guest, a device with no
standby: a domain holding one has it *carried* (:class:`Passenger`) by QEMU's state copy
onto a free mdev of the destination's pool of the same name (kind ``mdev``, one mdev type
per pool, ``state-copy`` on both hosts), its UUID rewritten in the destination's and the
persistent XML (:func:`~host.domain.domain_xml.retarget_hostdev`, as Nova's
``_update_mdev_xml`` rewrites ``target_mdevs``).  A passenger that cannot be carried (in
no pool here, the pools not saying ``state-copy`` on both hosts or differing in type, a
blocker naming it or the whole VM, no free mdev there) refuses the migration in preflight,
before anything changed: unplugging it would lose its state with nothing in its place, and
Nova likewise aborts a migration whose mdev has no destination UUID.  (The other model, an
mdev as a team's primary switched and replugged like a VF when it cannot be copied, was
not built: it would need a NIC offered as an mdev to be anything but untested code, and
``PrimaryDevice`` refuses kind ``mdev``.)  Forcing a switch
concerns teams only: a passenger has nothing to switch to.  Once the VM moved there is
nothing to record (no metadata names a passenger); on a rollback nothing was plugged on the
destination, and the destination's mdev is free again as soon as its QEMU is gone (the
claim is the migration itself, as for a state-copied PCI primary).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from host.domain.domain_xml import DomainInfo, MdevHostdev
from host.domain.errors import DomainModelError
from host.domain.kinds import PoolKind
from host.domain.pools import (
    MdevPool,
    MdevSlot,
    PciPool,
    PciSlot,
    Pool,
    parse_pool_network,
    pool_network_name,
)
from host.domain.teams import PrimaryDevice, Team
from host.hypervisor import Hypervisor, HypervisorError
from host.workflow.drift import TeamClassification
from host.workflow.errors import PreflightError, WorkflowError
from host.workflow.guest import Guest
from host.workflow.inventory import DeviceView, pool_networks, pool_on

log = logging.getLogger(__name__)


class Way(StrEnum):
    """How a team's primary crosses a migration."""

    #: Stays plugged; QEMU copies the device's state onto the destination's device.
    COPY = "copy-state"
    #: Switched to the standby, unplugged, a destination device plugged after (as always).
    SWITCH = "switch"


@dataclass(frozen=True)
class TeamWay:
    """Which way one team (or passenger device) goes and why; `destination` is the device a
    kept primary's state is copied onto (a PCI address of the destination's pool; an mdev's
    UUID for a passenger)."""

    way: Way
    reason: str
    destination: str | None = None

    def line(self) -> str:
        return f"{self.way}: {self.reason}"


@dataclass(frozen=True)
class Candidate:
    """What the decision needs of one team: its record, the device plugged for it (from
    the live domain; None: none), and its pool on each host."""

    team: Team
    device: PrimaryDevice | None
    source_pool: Pool | None
    destination_pool: Pool | None


@dataclass(frozen=True)
class Passenger:
    """A mediated device the domain holds (no team's), and the pool of its name on each
    host: the mdev pool here that lists its UUID (None: none does), and the pool of that
    name on the destination (None: none, or not read)."""

    device: MdevHostdev
    source_pool: MdevPool | None
    destination_pool: Pool | None


@dataclass(frozen=True)
class Forced:
    """The operator's override: switch every team, or these teams, whatever their pools
    allow (the faces' ``--switch-all`` / ``--switch TEAM``)."""

    every: bool = False
    teams: frozenset[str] = frozenset()

    def __bool__(self) -> bool:
        return self.every or bool(self.teams)

    def reason(self, team: str) -> str | None:
        """Why *team* switches by the operator's word, or None: it does not."""
        if self.every:
            return "forced by the operator, for every team"
        return "forced by the operator, for this team" if team in self.teams else None


def names_device(reason: str, device: PrimaryDevice | MdevHostdev) -> bool:
    """Whether QEMU's blocker `reason` names `device` (its alias is QEMU's id; vfio-pci
    names a device by its host address, an mdev by its UUID, the sysfs name it was given)."""
    if isinstance(device, MdevHostdev):
        names = [n for n in (device.alias, device.uuid) if n]
    else:
        names = [n for n in (device.alias, device.pci_address) if n]
    return any(name in reason for name in names)


def choose_ways(
    candidates: Sequence[Candidate],
    *,
    blockers: Sequence[str],
    destination_free: Mapping[str, Sequence[str]],
    forced: Forced = Forced(),
) -> dict[str, TeamWay]:
    """Each team's way.  `blockers`: QEMU's blocked-reasons now (every primary still
    plugged); `destination_free`: per pool, the PCI addresses free on the destination."""
    lasting = lasting_blockers(candidates, blockers, forced)
    free = {pool: list(addresses) for pool, addresses in destination_free.items()}
    ways: dict[str, TeamWay] = {}
    for c in candidates:
        ways[c.team.name] = _one(c, blockers, lasting, free, forced)
    return ways


def lasting_blockers(
    candidates: Sequence[Candidate], blockers: Sequence[str], forced: Forced = Forced()
) -> list[str]:
    """QEMU's blockers that stay once the switched primaries are unplugged: those naming
    none of them.  A primary a blocker names switches too (QEMU blocks it), so its own
    blockers do not hold the others, passengers included."""
    switched = [
        c.device
        for c in candidates
        if c.device is not None
        and (
            not _may_copy(c)
            or forced.reason(c.team.name)
            or any(names_device(r, c.device) for r in blockers)
        )
    ]
    return [r for r in blockers if not any(names_device(r, d) for d in switched)]


def _may_copy(c: Candidate) -> bool:
    """The pool and device allow a copy (blockers and free devices aside)."""
    return _refusal(c) is None


def _refusal(c: Candidate) -> str | None:
    if c.device is None:
        return "no primary plugged"
    if c.device.kind is not PoolKind.PCI or not isinstance(c.source_pool, PciPool):
        return f"pool {c.team.pool} is not a pci pool: only a PCI hostdev's state is copied"
    if not c.source_pool.state_copy:
        return f"pool {c.team.pool} here is not marked state-copy"
    if not isinstance(c.destination_pool, PciPool) or not c.destination_pool.state_copy:
        return f"pool {c.team.pool} on the destination is not a pci pool marked state-copy"
    return None


def _one(
    c: Candidate,
    blockers: Sequence[str],
    lasting: Sequence[str],
    free: dict[str, list[str]],
    forced: Forced,
) -> TeamWay:
    override = forced.reason(c.team.name)
    if override is not None:
        return TeamWay(Way.SWITCH, override)
    refusal = _refusal(c)
    if refusal is not None:
        return TeamWay(Way.SWITCH, refusal)
    assert c.device is not None
    own = [r for r in blockers if names_device(r, c.device)]
    if own:
        return TeamWay(Way.SWITCH, f"QEMU blocks it: {'; '.join(own)}")
    if lasting:
        return TeamWay(Way.SWITCH, f"QEMU blocks the VM: {'; '.join(lasting)}")
    addresses = free.get(c.team.pool, [])
    if not addresses:
        return TeamWay(Way.SWITCH, f"no free device in pool {c.team.pool} on the destination")
    destination = addresses.pop(0)
    return TeamWay(
        Way.COPY,
        f"pool {c.team.pool} is marked state-copy on both hosts and QEMU names no blocker; "
        f"its state goes to {destination}",
        destination,
    )


def carry(
    passengers: Sequence[Passenger],
    *,
    lasting: Sequence[str],
    destination_free: Mapping[str, Sequence[str]],
) -> dict[str, TeamWay]:
    """Each passenger's way, by UUID: always a copy, onto a free mdev of the destination's
    pool (`destination_free`: per pool, its free UUIDs there); `lasting`: QEMU's blockers
    that stay once the switched primaries are unplugged.  Any passenger that cannot be
    carried refuses the migration (PreflightError naming each), since it has no standby."""
    free = {pool: list(uuids) for pool, uuids in destination_free.items()}
    ways: dict[str, TeamWay] = {}
    refused = []
    for p in passengers:
        why = _not_carried(p, lasting, free)
        if why is not None:
            refused.append(f"mdev {p.device.uuid}: {why}")
            continue
        assert p.source_pool is not None
        pool = p.source_pool
        destination = free[pool.name].pop(0)
        ways[p.device.uuid] = TeamWay(
            Way.COPY,
            f"pool {pool.name} ({pool.mdev_type}) is marked state-copy on both hosts and QEMU "
            f"names no blocker; its state goes to {destination}",
            destination,
        )
    if refused:
        raise PreflightError(
            "; ".join(refused) + " (a mediated device has no standby: ptmig moves one only "
            "by QEMU's state copy; detach it to migrate without it)"
        )
    return ways


def _not_carried(p: Passenger, lasting: Sequence[str], free: Mapping[str, list[str]]) -> str | None:
    pool = p.source_pool
    if pool is None:
        return (
            "in no mdev pool on this host: define one on both hosts (ptmig pool-define "
            "--kind mdev --state-copy) so that ptmig can choose its destination device"
        )
    if not pool.state_copy:
        return f"pool {pool.name} here is not marked state-copy"
    there = p.destination_pool
    if not isinstance(there, MdevPool) or not there.state_copy:
        return f"pool {pool.name} on the destination is not an mdev pool marked state-copy"
    if there.mdev_type != pool.mdev_type:
        return (
            f"pool {pool.name} holds type {pool.mdev_type} here and {there.mdev_type} on the "
            "destination"
        )
    own = [r for r in lasting if names_device(r, p.device)]
    if own:
        return f"QEMU blocks it: {'; '.join(own)}"
    if lasting:
        return f"QEMU blocks the VM: {'; '.join(lasting)}"
    if not free.get(pool.name):
        return f"no free mdev in pool {pool.name} on the destination"
    return None


def devices_here(source: Hypervisor, mdevs: Sequence[MdevHostdev]) -> dict[str, str]:
    """What status says of each mediated device the domain holds, before any migration:
    whether this host's side lets it be carried (the destination's pool, QEMU's blockers
    and its free mdevs decide at migrate), by UUID; empty for a domain with none."""
    if not mdevs:
        return {}
    here = mdev_pools(source)
    out = {}
    for mdev in mdevs:
        pool = pool_holding(here, mdev.uuid)
        if pool is None:
            out[mdev.uuid] = "refused at migrate: in no mdev pool on this host"
        elif not pool.state_copy:
            out[mdev.uuid] = f"refused at migrate: pool {pool.name} here is not marked state-copy"
        else:
            out[mdev.uuid] = (
                f"{Way.COPY} if the destination agrees: pool {pool.name} ({pool.mdev_type}) is "
                "marked state-copy here; the destination's pool, QEMU's blockers and its free "
                "mdevs decide at migrate"
            )
    return out


def passengers_blocked(
    passengers: Mapping[str, TeamWay],
    blockers: Sequence[str],
    unplugging: Sequence[PrimaryDevice] = (),
) -> str | None:
    """After the unplug: why the carried passengers cannot go after all (a blocker left
    that names none of the primaries being unplugged now, *unplugging*), or None.  The
    workflow then rolls back."""
    blockers = [r for r in blockers if not any(names_device(r, d) for d in unplugging)]
    if not passengers or not blockers:
        return None
    return (
        f"QEMU still blocks the VM once the primaries were unplugged ({'; '.join(blockers)}), "
        f"and mdev {', '.join(passengers)} cannot be switched: rolling back"
    )


def moves(
    ways: Mapping[str, TeamWay],
    classification: Mapping[str, TeamClassification],
    passengers: Mapping[str, TeamWay],
) -> dict[str, str]:
    """Each device whose state QEMU copies, by its host identity here -> the destination's
    (kept primaries: PCI addresses; passengers: mdev UUIDs), for the migration's XML."""
    out = {}
    for name in kept(ways):
        device = classification[name].device
        destination = ways[name].destination
        if device is None or device.pci_address is None or destination is None:
            raise WorkflowError(f"team {name}: no device to copy the state of")
        out[device.pci_address] = destination
    for uuid, way in passengers.items():
        if way.destination is None:  # pragma: no cover - carry() always names one
            raise WorkflowError(f"mdev {uuid}: no destination device")
        out[uuid] = way.destination
    return out


def way_here(c: Candidate) -> str:
    """What status says of a team before any migration: whether this host's side allows a
    state copy ("" when the pool does not ask for one, the usual case)."""
    if c.device is None or not isinstance(c.source_pool, PciPool) or not c.source_pool.state_copy:
        return ""
    refusal = _refusal(dataclasses.replace(c, destination_pool=c.source_pool))
    if refusal is not None:
        return f"{Way.SWITCH}: {refusal}"
    return (
        f"{Way.COPY} if the destination agrees: pool {c.team.pool} is marked state-copy here; "
        "QEMU's blockers and the destination's pool decide at migrate"
    )


def still_blocked(ways: Mapping[str, TeamWay], blockers: Sequence[str]) -> dict[str, TeamWay]:
    """After the switched primaries are unplugged: QEMU still blocking means every kept
    team is switched too (the migration would be refused with them plugged)."""
    if not blockers:
        return dict(ways)
    reason = f"QEMU still blocks the VM once the others were unplugged: {'; '.join(blockers)}"
    return {
        name: TeamWay(Way.SWITCH, reason) if way.way is Way.COPY else way
        for name, way in ways.items()
    }


def kept(ways: Mapping[str, TeamWay]) -> list[str]:
    """The teams whose primary stays plugged."""
    return [name for name, way in ways.items() if way.way is Way.COPY]


@dataclass(frozen=True)
class Plan:
    """Preflight's hybrid decision: each team's way, each passenger's (by UUID), and
    whether the hybrid was in play at all (a pool here allows a state copy, the domain
    holds an mdev, or the operator forced a switch); when it was not, every team switches
    as ptmig always did and nothing new is reported."""

    ways: dict[str, TeamWay]
    considered: bool
    passengers: dict[str, TeamWay] = dataclasses.field(default_factory=dict)


def plan_ways(
    source: Guest,
    destination: Hypervisor,
    classified: Iterable[TeamClassification],
    *,
    live: DomainInfo | None = None,
    forced: Forced = Forced(),
) -> Plan:
    """Each team's and passenger's way through a migration of *source* to *destination*'s
    host: reads the pools of the teams on PCI primaries on both hosts, and only when one
    allows a copy or the domain holds an mdev (*live*: the live domain preflight read;
    None: read it again), QEMU's blockers and the destination's free devices.  A
    name in *forced* that is no team of the domain, or a passenger that cannot be
    carried, is a PreflightError."""
    classified = list(classified)
    unknown = sorted(forced.teams - {d.team.name for d in classified})
    if unknown:
        raise PreflightError(
            f"no team {', '.join(unknown)} in {source.name} to force the switch of "
            f"(its teams: {', '.join(d.team.name for d in classified) or 'none'})"
        )
    if live is None:
        live = source.info()
    candidates = []
    for d in classified:
        here = _pci_pool(source.hv, d)
        # The destination's pool matters only when this host's allows a copy: every other
        # migration reads no more pools than before the hybrid.
        there = _pci_pool(destination, d) if _state_copy(here) else None
        candidates.append(Candidate(d.team, _with_host_address(d.device, live), here, there))
    mdevs = live.mdevs
    passengers = _passengers(source.hv, destination, mdevs) if mdevs else []
    considered = (
        bool(forced) or bool(passengers) or any(_state_copy(c.source_pool) for c in candidates)
    )
    blockers: list[str] = []
    free: dict[str, list[str]] = {}
    carried: dict[str, TeamWay] = {}
    if passengers or any(c.device is not None and _state_copy(c.source_pool) for c in candidates):
        try:
            blockers = source.dom.migration_blockers()
        except HypervisorError as exc:
            blockers = [f"QEMU's blockers could not be read ({exc})"]
        held = DeviceView.read(destination)  # the destination's devices, for this step
        pools = [c.destination_pool for c in candidates] + [p.destination_pool for p in passengers]
        for pool in pools:
            if isinstance(pool, (PciPool, MdevPool)) and pool.state_copy and pool.name not in free:
                slots = held.free_slots(pool)
                free[pool.name] = [
                    s.address if isinstance(s, PciSlot) else s.uuid
                    for s in slots
                    if isinstance(s, (PciSlot, MdevSlot))
                ]
        carried = carry(
            passengers,
            lasting=lasting_blockers(candidates, blockers, forced),
            destination_free=free,
        )
    ways = choose_ways(candidates, blockers=blockers, destination_free=free, forced=forced)
    return Plan(ways, considered, carried)


def _with_host_address(device: PrimaryDevice | None, live: DomainInfo) -> PrimaryDevice | None:
    """*device* with the host PCI address the live domain shows for it: QEMU's blockers
    name a vfio-pci device by that address, and a VF's record has none (libvirt picks
    the VF; its live XML says which)."""
    if device is None or device.pci_address is not None:
        return device
    plugged = live.device(device.alias)
    address = getattr(plugged, "host_pci_address", None)
    return dataclasses.replace(device, pci_address=address) if address else device


def _passengers(
    source: Hypervisor, destination: Hypervisor, mdevs: Sequence[MdevHostdev]
) -> list[Passenger]:
    """The domain's mdevs with their pools on both hosts: the mdev pools here are all
    read (a passenger names no pool; its UUID does), the destination's by name."""
    pools = mdev_pools(source)
    theirs: dict[str, Pool | None] = {}
    out = []
    for mdev in mdevs:
        here = pool_holding(pools, mdev.uuid)
        if here is not None and here.name not in theirs:
            there = destination.network_xml(pool_network_name(here.name))
            try:
                theirs[here.name] = parse_pool_network(there) if there is not None else None
            except DomainModelError as exc:
                raise PreflightError(f"{destination.uri}: pool {here.name}: {exc}") from exc
        out.append(Passenger(mdev, here, theirs.get(here.name) if here else None))
    return out


def pool_holding(pools: Sequence[MdevPool], uuid: str) -> MdevPool | None:
    """The mdev pool that lists *uuid* (a passenger names no pool; its UUID does)."""
    return next((p for p in pools if uuid in p.uuids), None)


def mdev_pools(hv: Hypervisor, *, strict: bool = True) -> list[MdevPool]:
    """Every mdev pool of *hv*'s host.  *strict*: one that cannot be read is a
    PreflightError (it may be the one that lists the domain's mdev); else it is logged and
    left out (an evacuation's plan only ranks targets: the domain's preflight meets it)."""
    pools = []
    for name, xml in pool_networks(hv):
        try:
            pool = parse_pool_network(xml)
        except DomainModelError as exc:
            if not strict:
                log.warning("%s: pool network %s unreadable: %s", hv.uri, name, exc)
                continue
            raise PreflightError(f"{hv.uri}: pool network {name}: {exc}") from exc
        if isinstance(pool, MdevPool):
            pools.append(pool)
    return pools


def _pci_pool(hv: Hypervisor, found: TeamClassification) -> Pool | None:
    """The pool on *hv*'s host of a team on a PCI primary (the only kind whose state is
    copied); None for any other, or a pool that cannot be read there (it then switches)."""
    if found.device is None or found.device.kind is not PoolKind.PCI:
        return None
    try:
        return pool_on(hv, found.team)
    except WorkflowError:
        return None


def _state_copy(pool: Pool | None) -> bool:
    return isinstance(pool, PciPool) and bool(pool.state_copy)
