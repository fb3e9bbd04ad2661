"""What is really there, team by team: the live domain against ptmig's team record.

The live domain is the truth; the team metadata is ptmig's memory of it.  Operators
detach and attach devices with virsh, and a degraded domain waits for its reconciler:
every face that acts on a team (migrate's preflight, the reconciler, status, team-show)
asks :func:`classify_teams` first, so they cannot disagree about the same domain.

    plugged         the recorded primary is plugged                  normal path
    on-standby      ... but the agent has the team on its standby    no switch; unplug, bind
    primary-absent  the recorded primary is not plugged              degraded: no switch, no
    no-primary      none is recorded and none is plugged             unplug; a new device
    unrecorded      one device of the team's pool is plugged but     adopt it, then normal
                    not recorded (attached by hand; or by ptmig,
                    whose alias names the team, when the
                    record could not be written)
    ambiguous       several such devices, or one that cannot be      refuse, change nothing
                    recorded

Three words, kept apart: a team's *classification* (:class:`TeamClassification`, what
:func:`classify_teams` returns), its *case* (:class:`TeamCase`, the first column above),
and its *drift*, the line a person reads where the record and the live domain disagree
(``TeamClassification.message`` when ``drifted``; the ``drift`` field of ``status``,
``team-show`` and the migration report, whose ``drift`` map holds each team's case).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from host.agent_client import TeamState
from host.domain.devices import is_primary_alias_of, primary_of_device
from host.domain.domain_xml import DomainInfo, Hostdev, Interface
from host.domain.errors import DomainModelError
from host.domain.pools import Pool, is_pool_device
from host.domain.teams import PrimaryDevice, Team

FAILOVER_HINT = "'ptmig failover --to primary' plugs one"


class TeamCase(enum.StrEnum):
    PLUGGED = "plugged"
    ON_STANDBY = "on-standby"
    PRIMARY_ABSENT = "primary-absent"
    NO_PRIMARY = "no-primary"
    UNRECORDED = "unrecorded"
    AMBIGUOUS = "ambiguous"


@dataclass(frozen=True)
class TeamClassification:
    """One team's classification: its case, with a line a person can act on."""

    team: Team  # as recorded
    case: TeamCase
    message: str
    #: The device plugged for the team: the recorded one, or the one to adopt.
    device: PrimaryDevice | None = None

    @property
    def drifted(self) -> bool:
        """The record (or the agent) says otherwise than the live domain."""
        return self.case not in (TeamCase.PLUGGED, TeamCase.NO_PRIMARY)

    @property
    def degraded(self) -> bool:
        """No device is plugged for the team: it runs on its standby."""
        return self.case in (TeamCase.PRIMARY_ABSENT, TeamCase.NO_PRIMARY)

    @property
    def refused(self) -> bool:
        """ptmig cannot tell which device is the team's; a person must."""
        return self.case is TeamCase.AMBIGUOUS

    @property
    def summary(self) -> str:
        return f"team {self.team.name}: {self.case}: {self.message}"


def classify_teams(
    info: DomainInfo,
    pools: Mapping[str, Pool | None],
    agent: Mapping[str, TeamState] | None = None,
) -> tuple[TeamClassification, ...]:
    """Each recorded team of the live domain *info*, classified.

    *pools* are the teams' pools as this host defines them (None: not defined here, so
    no device can be recognised as the pool's); *agent* is the guest's view per team,
    when asked for (without it a plugged primary counts as carrying traffic).
    """
    teams = info.teams.teams if info.teams is not None else ()
    recorded = {t.primary.alias for t in teams if t.primary is not None}
    plugged = {
        t.name for t in teams if t.primary is not None and info.device(t.primary.alias) is not None
    }
    devices: list[Interface | Hostdev] = [*info.interfaces, *info.hostdevs]
    unrecorded: dict[str, list[str]] = {}  # pool -> aliases of its devices no team records
    for pool_name, pool in pools.items():
        if pool is not None:
            unrecorded[pool_name] = [
                d.alias
                for d in devices
                if d.alias and d.alias not in recorded and is_pool_device(pool, d)
            ]
    # A device ptmig plugged for a team but could not record (its libvirtd restarted
    # between the attach and the metadata write) carries that team's alias: it is that
    # team's alone, whatever other team of the pool lacks a primary.
    own = {
        t.name: [a for a in unrecorded.get(t.pool, []) if is_primary_alias_of(t.name, a)]
        for t in teams
    }
    claimed = {a for aliases in own.values() for a in aliases}
    out = []
    for team in teams:
        if own[team.name]:
            candidates, wanting = own[team.name], 1
        else:
            candidates = [a for a in unrecorded.get(team.pool, []) if a not in claimed]
            wanting = sum(
                1
                for t in teams
                if t.pool == team.pool and t.name not in plugged and not own[t.name]
            )
        out.append(
            _classify(
                team,
                info,
                team.name in plugged,
                candidates,
                wanting,
                agent.get(team.name) if agent is not None else None,
            )
        )
    return tuple(out)


def _classify(
    team: Team,
    info: DomainInfo,
    plugged: bool,
    candidates: list[str],
    wanting: int,
    state: TeamState | None,
) -> TeamClassification:
    if plugged:
        assert team.primary is not None
        alias = team.primary.alias
        if state is not None and not state.on_primary:
            return TeamClassification(
                team,
                TeamCase.ON_STANDBY,
                f"primary {alias} is plugged but the team runs on its standby; "
                "'ptmig failover --to primary' binds it",
                team.primary,
            )
        return TeamClassification(
            team, TeamCase.PLUGGED, f"primary {alias} is plugged", team.primary
        )
    if candidates:
        names = ", ".join(candidates)
        if len(candidates) > 1 or wanting > 1:
            return TeamClassification(
                team,
                TeamCase.AMBIGUOUS,
                f"device(s) {names} of pool {team.pool} are plugged but not "
                f"recorded, for {wanting} team(s) without a primary: record one "
                "with 'ptmig team-set --primary-alias' or unplug the others",
            )
        device = info.device(candidates[0])
        assert device is not None
        try:
            primary = primary_of_device(candidates[0], device)
        except DomainModelError as exc:
            return TeamClassification(
                team,
                TeamCase.AMBIGUOUS,
                f"device {names} of pool {team.pool} is plugged but not recorded, "
                f"and cannot be: {exc}",
            )
        return TeamClassification(
            team,
            TeamCase.UNRECORDED,
            f"device {names} of pool {team.pool} is plugged but not recorded; "
            "ptmig adopts it as the team's primary",
            primary,
        )
    if team.primary is not None:
        return TeamClassification(
            team,
            TeamCase.PRIMARY_ABSENT,
            f"recorded primary {team.primary.alias} is not plugged; the team is "
            f"degraded: {FAILOVER_HINT}",
        )
    return TeamClassification(
        team, TeamCase.NO_PRIMARY, f"no primary is plugged; the team is degraded: {FAILOVER_HINT}"
    )
