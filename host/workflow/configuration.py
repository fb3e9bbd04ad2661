"""Configuration: a domain's teams in its metadata, a host's pools as libvirt networks.

Each change is one libvirt call, journaled as a workflow of its own (begun before,
closed after) so that ``recover`` and ``workflows`` see it; no lease is taken."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from host.domain.devices import primary_of_device
from host.domain.domain_xml import DomainInfo
from host.domain.errors import UnknownName
from host.domain.kinds import PoolKind
from host.domain.pools import (
    Pool,
    format_pool_network,
    parse_pool_network,
    pool_network_name,
)
from host.domain.teams import PrimaryDevice, Team, TeamSet
from host.workflow.errors import WorkflowError
from host.workflow.guest import Guest
from host.workflow.inventory import DeviceView, pool_status
from host.workflow.journal import Journal, WorkflowKind
from host.workflow.model import DomainTeams, Outcome, PoolStatus, TeamRequest, plain
from host.workflow.runtime import Runtime

#: The journal's kinds of the one-call changes above.
CONFIGURATION_KINDS = frozenset(
    {
        WorkflowKind.TEAM_SET,
        WorkflowKind.TEAM_REMOVE,
        WorkflowKind.POOL_DEFINE,
        WorkflowKind.POOL_UNDEFINE,
    }
)


def team_show(rt: Runtime, uri: str, domain: str) -> DomainTeams:
    with rt.connect(uri) as hv:
        guest = rt.guest(hv, domain)
        return domain_teams(guest, guest.info().teams or TeamSet())


def team_set(rt: Runtime, uri: str, domain: str, request: TeamRequest) -> DomainTeams:
    """Add the team to the domain's metadata, or replace the team of that name."""
    with rt.connect(uri) as hv:
        guest = rt.guest(hv, domain)
        info = guest.info()
        primary = None
        if request.primary_alias:
            primary = primary_of(info, request.primary_alias)
        team = Team(
            request.name,
            request.standby_mac,
            request.mac_policy,
            request.pool,
            team_mac=request.team_mac,
            primary=primary,
        )
        teams = (info.teams or TeamSet()).with_team(team)
        with journaled(
            rt.journal, WorkflowKind.TEAM_SET, guest.uuid, guest.name, uri, plain(request)
        ):
            guest.save_teams(teams)
        return domain_teams(guest, teams)


def team_remove(rt: Runtime, uri: str, domain: str, team: str) -> DomainTeams:
    with rt.connect(uri) as hv:
        guest = rt.guest(hv, domain)
        teams = guest.info().teams or TeamSet()
        remaining = TeamSet(tuple(t for t in teams.teams if t.name != team))
        if len(remaining.teams) == len(teams.teams):
            raise UnknownName(f"{guest.name} has no team {team!r}")
        with journaled(
            rt.journal, WorkflowKind.TEAM_REMOVE, guest.uuid, guest.name, uri, {"team": team}
        ):
            guest.save_teams(remaining)
        return domain_teams(guest, remaining)


def pool_define(rt: Runtime, uri: str, pool: Pool) -> PoolStatus:
    """Define *pool* on the host, or redefine the pool of that name; VF networks are
    started (libvirt lists a PF's VFs only then), the others stay inert."""
    xml = format_pool_network(pool)
    with rt.connect(uri) as hv:
        with journaled(
            rt.journal,
            WorkflowKind.POOL_DEFINE,
            _pool_subject(pool.name, uri),
            pool.name,
            uri,
            {"network_xml": xml},
        ):
            hv.define_network(xml, start=pool.kind is PoolKind.VF_NETWORK)
        defined = hv.network_xml(pool.network)
        if defined is None:
            raise WorkflowError(f"{uri}: pool {pool.name} vanished as it was defined")
        return pool_status(parse_pool_network(defined), DeviceView.read(hv))


def pool_undefine(rt: Runtime, uri: str, name: str) -> None:
    network = pool_network_name(name)
    with rt.connect(uri) as hv:
        if hv.network_xml(network) is None:
            raise UnknownName(f"{uri} has no pool {name!r}")
        with journaled(
            rt.journal,
            WorkflowKind.POOL_UNDEFINE,
            _pool_subject(name, uri),
            name,
            uri,
            {"network": network},
        ):
            hv.undefine_network(network)


@contextmanager
def journaled(
    journal: Journal,
    kind: WorkflowKind,
    subject: str,
    name: str,
    uri: str,
    request: dict[str, Any],
) -> Iterator[str]:
    """A one-call change as a workflow of its own: begun before, closed after."""
    workflow_id = journal.begin(kind, subject, name, uri, uri, request)
    try:
        yield workflow_id
    except Exception as exc:
        journal.finish(workflow_id, str(Outcome.FAILED), {"error": str(exc)})
        raise
    journal.finish(workflow_id, str(Outcome.DONE), {})


def _pool_subject(name: str, uri: str) -> str:
    """A pool's key in the journal's one-open-workflow-per-subject index."""
    return f"pool {name}@{uri}"


def domain_teams(guest: Guest, teams: TeamSet) -> DomainTeams:
    """The record, and where the live domain says otherwise (migrate's classification)."""
    classified = guest.classify() if teams.teams else ()
    return DomainTeams(
        guest.name,
        guest.uuid,
        teams.teams,
        cases={d.team.name: str(d.case) for d in classified},
        drift={d.team.name: d.message if d.drifted else "" for d in classified},
    )


def primary_of(info: DomainInfo, alias: str) -> PrimaryDevice:
    """The team metadata's record of the device *alias* plugged in the domain now."""
    device = info.device(alias)
    if device is None:
        raise UnknownName(f"{info.name} has no device with alias {alias!r}")
    return primary_of_device(alias, device)
