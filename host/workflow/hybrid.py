"""The hybrid migration: per team, copy the primary's state or switch to the standby.

A VFIO device whose kernel driver implements the VFIO migration interface (mlx5 and
virtio-net VFs, the ``mtty`` sample) can stay plugged through a live migration: QEMU
copies its state and the guest never leaves its fast path.  Every other primary is
switched to the standby and unplugged, as ptmig always does.  This module decides which
way each team goes, and why; the workflow (host/workflow/migration.py) acts on it.

A team stays plugged (:attr:`Way.COPY`) only when all of these hold, else it switches:

- the operator did not force the switch (``ptmig migrate --switch-all``);
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
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from host.domain.kinds import PoolKind
from host.domain.pools import PciPool, PciSlot, Pool, free_slots
from host.domain.teams import PrimaryDevice, Team
from host.hypervisor import Hypervisor, HypervisorError
from host.workflow.drift import TeamClassification
from host.workflow.errors import WorkflowError
from host.workflow.guest import Guest
from host.workflow.inventory import pool_on


class Way(StrEnum):
    """How a team's primary crosses a migration."""

    #: Stays plugged; QEMU copies the device's state onto the destination's device.
    COPY = "copy-state"
    #: Switched to the standby, unplugged, a destination device plugged after (as always).
    SWITCH = "switch"


@dataclass(frozen=True)
class TeamWay:
    """Which way one team goes and why; `destination` is the device a kept primary's
    state is copied onto (a PCI address of the destination's pool)."""

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


def names_device(reason: str, device: PrimaryDevice) -> bool:
    """Whether QEMU's blocker `reason` names `device` (its alias is QEMU's id; vfio-pci
    names a device by its host address)."""
    names = [n for n in (device.alias, device.pci_address) if n]
    return any(name in reason for name in names)


def choose_ways(
    candidates: Sequence[Candidate],
    *,
    blockers: Sequence[str],
    destination_free: Mapping[str, Sequence[str]],
    force_switch: bool = False,
) -> dict[str, TeamWay]:
    """Each team's way.  `blockers`: QEMU's blocked-reasons now (every primary still
    plugged); `destination_free`: per pool, the PCI addresses free on the destination."""
    switched = [c.device for c in candidates if c.device is not None and not _may_copy(c)]
    # A blocker that names no primary about to be unplugged stays after the unplug.
    lasting = [r for r in blockers if not any(names_device(r, d) for d in switched)]
    free = {pool: list(addresses) for pool, addresses in destination_free.items()}
    ways: dict[str, TeamWay] = {}
    for c in candidates:
        ways[c.team.name] = _one(c, lasting, free, force_switch)
    return ways


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
    c: Candidate, lasting: Sequence[str], free: dict[str, list[str]], force_switch: bool
) -> TeamWay:
    if force_switch:
        return TeamWay(Way.SWITCH, "the operator forced the switch")
    refusal = _refusal(c)
    if refusal is not None:
        return TeamWay(Way.SWITCH, refusal)
    assert c.device is not None
    own = [r for r in lasting if names_device(r, c.device)]
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
    """Preflight's hybrid decision: each team's way, and whether the hybrid was in play
    at all (a pool here allows a state copy, or the operator forced the switch); when it
    was not, every team switches as ptmig always did and nothing new is reported."""

    ways: dict[str, TeamWay]
    considered: bool


def plan_ways(
    source: Guest,
    destination: Hypervisor,
    classified: Iterable[TeamClassification],
    *,
    switch_all: bool,
) -> Plan:
    """Each team's way through a migration of *source* to *destination*'s host: reads the
    pools of the teams on PCI primaries on both hosts, and only when one allows a copy,
    QEMU's blockers and the destination's free devices."""
    candidates = []
    for d in classified:
        here = _pci_pool(source.hv, d)
        # The destination's pool matters only when this host's allows a copy: every other
        # migration reads no more pools than before the hybrid.
        there = _pci_pool(destination, d) if _state_copy(here) else None
        candidates.append(Candidate(d.team, d.device, here, there))
    considered = switch_all or any(_state_copy(c.source_pool) for c in candidates)
    blockers: list[str] = []
    free: dict[str, list[str]] = {}
    if any(c.device is not None and _state_copy(c.source_pool) for c in candidates):
        try:
            blockers = source.dom.migration_blockers()
        except HypervisorError as exc:
            blockers = [f"QEMU's blockers could not be read ({exc})"]
        domains = destination.all_domain_xml()
        for c in candidates:
            pool = c.destination_pool
            if isinstance(pool, PciPool) and pool.state_copy and pool.name not in free:
                slots = free_slots(pool, domains)
                free[pool.name] = [s.address for s in slots if isinstance(s, PciSlot)]
    ways = choose_ways(
        candidates, blockers=blockers, destination_free=free, force_switch=switch_all
    )
    return Plan(ways, considered)


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
