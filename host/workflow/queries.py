"""What the coordinator answers without changing anything: a domain's status, a host's
pools, the journal's recent workflows."""

from __future__ import annotations

import json

from host.domain.teams import PrimaryDevice, Team
from host.workflow.drift import TeamCase
from host.workflow.errors import WorkflowError
from host.workflow.guest import Guest
from host.workflow.hybrid import Candidate, way_here
from host.workflow.inventory import pool_statuses
from host.workflow.journal import WorkflowRecord
from host.workflow.model import DomainStatus, PoolStatus, TeamMode, TeamStatus, WorkflowSummary
from host.workflow.observer import notify
from host.workflow.runtime import Runtime


def _way_here(guest: Guest, team: Team, device: PrimaryDevice | None) -> str:
    """The team's hybrid line for status; a pool that cannot be read says nothing here
    (the pools command reports it)."""
    if device is None:
        return ""
    try:
        pool = guest.pool(team)
    except WorkflowError:
        return ""
    return way_here(Candidate(team, device, pool, None))


def status(rt: Runtime, uri: str, domain: str) -> DomainStatus:
    with rt.connect(uri) as hv:
        guest = rt.guest(hv, domain)
        try:
            guest.teams()  # none: refused at once, not after the agent's deadline
            agent_error = ""
            state = None
            try:
                state = guest.agent().state()
            except Exception as exc:
                agent_error = str(exc)
            states = {t.name: t for t in state.teams} if state is not None else {}
            out = []
            for found in guest.classify(state):  # the same classification as migrate's
                team = found.team
                ts = states.get(team.name)
                detail = ""
                if state is None or (ts is None and not found.degraded):
                    mode = TeamMode.UNKNOWN
                    detail = (
                        f"guest agent: {agent_error}"
                        if agent_error
                        else "the guest agent does not know this team"
                    )
                elif found.case is TeamCase.PLUGGED:
                    mode = TeamMode.PRIMARY
                elif found.case is TeamCase.ON_STANDBY:
                    mode = TeamMode.STANDBY
                elif found.case is TeamCase.UNRECORDED and ts is not None:
                    # plugged by hand: the bond may run on it; the drift line says so
                    mode = TeamMode.PRIMARY if ts.on_primary else TeamMode.STANDBY
                else:
                    mode = TeamMode.DEGRADED
                out.append(
                    TeamStatus(
                        name=team.name,
                        mode=mode,
                        pool=team.pool,
                        mac_policy=team.mac_policy,
                        primary=team.primary,
                        active_member=ts.active_member if ts else "",
                        members=ts.members if ts else (),
                        detail=detail,
                        case=str(found.case),
                        drift=found.message if found.drifted else "",
                        way=_way_here(guest, team, found.device),
                    )
                )
            open_workflow = rt.journal.open_for_domain(guest.uuid)
            return DomainStatus(
                domain=guest.name,
                uuid=guest.uuid,
                uri=uri,
                teams=tuple(out),
                open_workflow_id=open_workflow.id if open_workflow else "",
                agent_error=agent_error,
            )
        finally:
            guest.close()


def pools(rt: Runtime, uri: str) -> list[PoolStatus]:
    with rt.connect(uri) as hv:
        out = pool_statuses(hv)
        for pool in out:
            if pool.free is not None:
                notify(rt.observer.pool_free, uri, pool.name, pool.free, pool.total)
        return out


def workflows(rt: Runtime, limit: int) -> list[WorkflowSummary]:
    return [workflow_summary(w, rt.journal.is_owner_alive(w)) for w in rt.journal.recent(limit)]


def workflow_summary(record: WorkflowRecord, owner_alive: bool) -> WorkflowSummary:
    return WorkflowSummary(
        id=record.id,
        kind=str(record.kind),
        domain_uuid=record.domain_uuid,
        domain_name=record.domain_name,
        source_uri=record.source_uri,
        destination_uri=record.destination_uri,
        state=str(record.state),
        outcome=record.outcome or "",
        created=record.created,
        updated=record.updated,
        owner_alive=owner_alive,
        report_json="" if record.report is None else json.dumps(record.report, default=str),
    )
