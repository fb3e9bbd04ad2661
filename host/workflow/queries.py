"""What the coordinator answers without changing anything: a domain's status, a host's
pools, the journal's recent workflows."""

from __future__ import annotations

import json

from host.agent_client.errors import printable
from host.agent_client.state import TeamEvent, TeamState
from host.domain.teams import PrimaryDevice, Team
from host.workflow.drift import TeamCase
from host.workflow.errors import WorkflowError
from host.workflow.guest import Guest
from host.workflow.hybrid import Candidate, devices_here, way_here
from host.workflow.inventory import pool_statuses
from host.workflow.journal import WorkflowRecord
from host.workflow.model import (
    DomainStatus,
    GuestEvent,
    PoolStatus,
    TeamMode,
    TeamStatus,
    WorkflowSummary,
)
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


def _devices_here(guest: Guest) -> dict[str, str]:
    """The domain's mediated devices for status; pools that cannot be read say so."""
    try:
        return devices_here(guest.hv, guest.info().mdevs)
    except WorkflowError as exc:
        return {"?": f"the pools cannot be read: {exc}"}


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
                        managed_by_guest=bool(ts and ts.managed_by_guest),
                        last_event=guest_event(ts) if ts else None,
                    )
                )
            recorded = {t.name for t in out}
            out += [
                guest_managed_status(ts)
                for ts in states.values()
                if ts.managed_by_guest and ts.name not in recorded
            ]
            open_workflow = rt.journal.open_for_domain(guest.uuid)
            return DomainStatus(
                domain=guest.name,
                uuid=guest.uuid,
                uri=uri,
                teams=tuple(out),
                open_workflow_id=open_workflow.id if open_workflow else "",
                agent_error=agent_error,
                devices=_devices_here(guest),
            )
        finally:
            guest.close()


GUEST_MANAGED_CASE = "guest-managed"


def guest_managed_status(ts: TeamState) -> TeamStatus:
    """A team the guest keeps whole by itself and ptmig's metadata does not record (a
    guest under Nova or KubeVirt): its mode as the agent reports it, no pool."""
    if ts.on_primary:
        mode = TeamMode.PRIMARY
    elif ts.primary:
        mode = TeamMode.STANDBY
    else:
        mode = TeamMode.DEGRADED
    return TeamStatus(
        name=ts.name,
        mode=mode,
        pool="",
        mac_policy=str(ts.mac_policy or ""),
        active_member=ts.active_member,
        members=ts.members,
        case=GUEST_MANAGED_CASE,
        managed_by_guest=True,
        last_event=guest_event(ts),
    )


def guest_event(ts: TeamState) -> GuestEvent | None:
    """A team's last event as its (validated) GetState reply says it, the free texts made
    printable and bounded."""
    event: TeamEvent | None = ts.last_event
    if event is None:
        return None
    return GuestEvent(
        kind=event.kind,
        device=event.device,
        reason=printable(event.reason),
        ok=event.ok,
        detail=printable(event.detail),
        unix_ms=event.unix_ms,
    )


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
