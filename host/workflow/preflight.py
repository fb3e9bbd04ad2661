"""Migrate's first step: refuse early, with a clear message, and change nothing but the
team record (made to say what the live domain has, once every check has passed).

Each team is classified by the live domain and the agent (host/workflow/drift.py); the
source must run the VM and the destination must not; every team's bond needs its
standby with carrier, and the destination a pool whose device may join the bond (its
MAC policy, host/workflow/macpolicy.py), and no team may name a pool of mediated
devices.  Too few free devices on the destination is not a refusal: the teams left
without one stay on their standby.  The hybrid's plan (host/workflow/hybrid.py) is made
last, still before the record is corrected: a mediated device it cannot carry, or a
forced switch naming no team, refuses with nothing changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from host.domain.pools import MdevPool, Pool
from host.domain.teams import Team
from host.hypervisor import Hypervisor
from host.workflow.drift import TeamClassification
from host.workflow.errors import PreflightError
from host.workflow.guest import Guest
from host.workflow.hybrid import Forced, Plan, plan_ways
from host.workflow.inventory import DeviceView, pool_on
from host.workflow.macpolicy import mac_policy_refusal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preflight:
    """What the checks found, for the steps after them."""

    recorded_before: tuple[Team, ...]  # as the metadata had them, before corrections
    teams: tuple[Team, ...]  # as now recorded
    classification: dict[str, TeamClassification]  # each team's case
    plugged_before: frozenset[str]  # teams with a device plugged
    on_primary_before: frozenset[str]  # teams the guest had on a primary
    free_on_destination: dict[str, int]  # per pool
    #: Each team's and mediated device's way (host/workflow/hybrid.py).
    plan: Plan

    def journal(self) -> dict[str, Any]:
        """The step's journal data; ``detail`` is its event's line."""
        found = list(self.classification.values())
        healthy = sum(1 for d in found if not d.drifted)
        detail = f"{healthy} of {len(found)} team(s) as recorded"
        if healthy < len(found):
            detail += ": " + ", ".join(f"{d.team.name} {d.case}" for d in found if d.drifted)
        return {
            "teams": [t.name for t in self.teams],
            "free_on_destination": self.free_on_destination,
            "cases": {name: str(d.case) for name, d in self.classification.items()},
            "detail": detail,
        }


def active_on(hv: Hypervisor, uuid: str) -> bool:
    """Whether *hv*'s host runs the domain *uuid*."""
    return hv.has_domain(uuid) and hv.domain(uuid).is_active()


def preflight(
    source: Guest,
    destination: Hypervisor,
    emit: Callable[[str], None],
    forced: Forced,
) -> Preflight:
    """Check that *source* can migrate to *destination*'s host, or raise PreflightError;
    *emit* tells what is not a refusal (drift found, too few free devices).  The hybrid's
    plan (*forced*: the operator's switch) is made here too, before the record is
    corrected: its refusals change nothing either."""
    if not source.dom.is_active():
        raise PreflightError(f"{source.name} is not running on {source.hv.uri}")
    if source.hv.host_uuid() == destination.host_uuid():
        raise PreflightError("source and destination are the same host")
    if active_on(destination, source.uuid):
        raise PreflightError(f"{source.name} is already running on the destination")
    info = source.info()  # the live domain, read once for this step
    recorded = source.teams(info).teams
    log.debug("preflight: hosts checked")
    agent = source.agent()
    try:
        if not agent.healthy():
            raise PreflightError(f"the agent in {source.name} is not serving")
        state = agent.state()
    except PreflightError:
        raise
    except Exception as exc:
        raise PreflightError(f"the agent in {source.name} does not answer: {exc}") from exc
    log.debug("preflight: agent answered")
    classified = source.classify(state, info)
    refused = [d.summary for d in classified if d.refused]
    if refused:
        raise PreflightError("; ".join(refused))
    links = {link.name: link for link in state.links}
    by_name = {t.name: t for t in state.teams}
    free: dict[str, int] = {}
    destination_pools: dict[str, Pool | None] = {}
    held: DeviceView | None = None  # the destination's devices, read once for this step
    for team in recorded:
        ts = by_name.get(team.name)
        if ts is None:
            raise PreflightError(f"the agent in {source.name} does not know team {team.name!r}")
        if not ts.bond_present:
            raise PreflightError(f"team {team.name}: bond {ts.bond} is missing in the guest")
        if not ts.standby or ts.standby not in ts.members:
            raise PreflightError(f"team {team.name}: the standby is not in bond {ts.bond}")
        standby = links.get(ts.standby)
        if standby is None or not standby.carrier:
            raise PreflightError(f"team {team.name}: the standby {ts.standby} has no carrier")
        if team.pool not in destination_pools:
            pool = pool_on(destination, team)
            destination_pools[team.pool] = pool
            if pool is not None and held is None:
                held = DeviceView.read(destination)
            free[team.pool] = held.free(pool) if held is not None else 0
        if destination_pools[team.pool] is None:
            raise PreflightError(f"team {team.name}: the destination has no pool {team.pool}")
        if isinstance(destination_pools[team.pool], MdevPool):
            raise PreflightError(
                f"team {team.name}: pool {team.pool} holds mediated devices, which are no "
                "team's primary (a domain's mdev is carried by a state copy): name a pool of "
                "NICs (ptmig team-set --pool)"
            )
        refusal = mac_policy_refusal(team, destination_pools[team.pool], ts)
        if refusal:
            raise PreflightError(refusal)
    # Teams may share a pool: compare what each pool has with what it is asked for.
    wanted = {pool: sum(1 for t in recorded if t.pool == pool) for pool in free}
    short = [pool for pool, n in wanted.items() if free[pool] < n]
    if short:
        teams = ", ".join(t.name for t in recorded if t.pool in short)
        pools = ", ".join(f"{p} has {free[p]} for {wanted[p]}" for p in short)
        emit(
            f"not enough free devices on the destination ({pools}): of "
            f"teams {teams}, those left without one stay on their standby"
        )
    plan = plan_ways(source, destination, classified, live=info, forced=forced)
    # Every check passed: now the record may be made to say what the domain has.
    for found in classified:
        if found.drifted:
            emit(found.summary)
    plugged = frozenset(d.team.name for d in classified if d.device is not None)
    return Preflight(
        recorded_before=tuple(recorded),
        teams=tuple(source.correct_record(d) for d in classified),
        classification={d.team.name: d for d in classified},
        plugged_before=plugged,
        on_primary_before=frozenset(n for n in plugged if by_name[n].on_primary),
        free_on_destination=free,
        plan=plan,
    )
