"""The one protobuf encoder per Coordinator answer, and the decoders of requests (and of
the migration report, for Python clients).

Each takes or gives the typed results of host/workflow/model.py; a request that is
malformed raises ValueError (INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from ptmig.v1 import coordinator_pb2 as pb

from host.domain.kinds import MacPolicy
from host.domain.names import check_name
from host.domain.pools import Pool, TapSlot, make_pool
from host.domain.teams import PrimaryDevice, Team
from host.migration_options import (
    CopyStorage,
    InvalidMigrationOptions,
    MigrationOptions,
    MigrationStats,
)
from host.workflow.model import (
    CancelResult,
    DomainEvacuation,
    DomainStatus,
    DomainTeams,
    EvacuationEvent,
    EvacuationReport,
    EvacuationRequest,
    EvacuationTarget,
    Event,
    FailoverResult,
    GuestEvent,
    MigrationReport,
    MigrationRequest,
    Outcome,
    PhaseTiming,
    PoolStatus,
    RecoverResult,
    TeamMode,
    TeamRequest,
    TeamStatus,
    WorkflowSummary,
    from_plain,
    plain,
)

# -- messages --------------------------------------------------------------------------

_OUTCOMES: dict[Outcome, Any] = {
    Outcome.DONE: pb.OUTCOME_DONE,
    Outcome.DONE_DEGRADED: pb.OUTCOME_DONE_DEGRADED,
    Outcome.ROLLED_BACK: pb.OUTCOME_ROLLED_BACK,
    Outcome.FAILED: pb.OUTCOME_FAILED,
}
_TEAM_MODES = {
    TeamMode.PRIMARY: pb.TEAM_MODE_PRIMARY,
    TeamMode.STANDBY: pb.TEAM_MODE_STANDBY,
    TeamMode.DEGRADED: pb.TEAM_MODE_DEGRADED,
    TeamMode.UNKNOWN: pb.TEAM_MODE_UNSPECIFIED,
}


def migration_request(message: Any) -> MigrationRequest:
    """The workflow's request for a MigrateRequest; ValueError names a missing field."""
    for name in ("domain", "source_uri", "destination_uri"):
        if not getattr(message, name):
            raise ValueError(f"MigrateRequest.{name} is required")
    return MigrationRequest(
        domain=message.domain,
        source_uri=message.source_uri,
        destination_uri=message.destination_uri,
        unsafe=message.unsafe,
        max_downtime_ms=message.max_downtime_ms or None,
        peer_uri=message.peer_uri or None,
        options=migration_options(message.options),
        switch_all=message.switch_all,
        switch_teams=tuple(
            dict.fromkeys(check_name(t, "switch_teams") for t in message.switch_teams)
        ),
    )


def evacuation_request(message: Any) -> EvacuationRequest:
    """The evacuation an EvacuateRequest asks for; ValueError (InvalidEvacuation) if it
    cannot run."""
    require(message, "source_uri")
    for target in message.targets:
        if not target.uri:
            raise ValueError("EvacuateRequest.targets[].uri is required")
    return EvacuationRequest(
        source_uri=message.source_uri,
        targets=tuple(EvacuationTarget(t.uri, t.peer_uri or None) for t in message.targets),
        parallel=message.parallel or 1,
        include_untied=message.include_untied,
        unsafe=message.unsafe,
        max_downtime_ms=message.max_downtime_ms or None,
        options=migration_options(message.options),
    )


_COPY_STORAGE = {
    CopyStorage.NONE: pb.COPY_STORAGE_NONE,
    CopyStorage.ALL: pb.COPY_STORAGE_ALL,
    CopyStorage.INCREMENTAL: pb.COPY_STORAGE_INCREMENTAL,
}


def migration_options(message: Any) -> MigrationOptions:
    """A MigrationOptions message as the workflow's; InvalidMigrationOptions (a
    ValueError: INVALID_ARGUMENT) when a value or a combination is refused."""
    copy = {v: k for k, v in _COPY_STORAGE.items()}.get(message.copy_storage)
    if copy is None:
        raise InvalidMigrationOptions(f"MigrationOptions.copy_storage {message.copy_storage}")
    return MigrationOptions(
        tls=message.tls,
        copy_storage=copy,
        migrate_disks=tuple(message.migrate_disks),
        bandwidth_mib_s=message.bandwidth_mib_s or None,
        auto_converge=message.auto_converge,
        postcopy=message.postcopy,
        postcopy_after_s=(
            message.postcopy_after_s if message.HasField("postcopy_after_s") else None
        ),
        parallel_connections=message.parallel_connections or None,
        libvirt_defaults=message.libvirt_defaults,
    )


def options_message(options: MigrationOptions) -> Any:
    """The MigrationOptions message for the workflow's (a client's MigrateRequest.options)."""
    message = pb.MigrationOptions(
        tls=options.tls,
        copy_storage=_COPY_STORAGE[options.copy_storage],
        migrate_disks=list(options.migrate_disks),
        bandwidth_mib_s=options.bandwidth_mib_s or 0,
        auto_converge=options.auto_converge,
        postcopy=options.postcopy,
        parallel_connections=options.parallel_connections or 0,
        libvirt_defaults=options.libvirt_defaults,
    )
    if options.postcopy_after_s is not None:
        message.postcopy_after_s = options.postcopy_after_s
    return message


def require(message: Any, *names: str) -> None:
    for name in names:
        if not getattr(message, name):
            raise ValueError(f"{type(message).__name__}.{name} is required")


def failover_target(message: Any) -> TeamMode:
    """The mode a FailoverRequest asks for; ValueError unless primary or standby."""
    require(message, "domain")
    targets = {pb.TEAM_MODE_PRIMARY: TeamMode.PRIMARY, pb.TEAM_MODE_STANDBY: TeamMode.STANDBY}
    if message.to not in targets:
        raise ValueError("FailoverRequest.to must be TEAM_MODE_PRIMARY or TEAM_MODE_STANDBY")
    return targets[message.to]


def team_request(message: Any) -> TeamRequest:
    """The Coordinator's TeamRequest for a SetTeamRequest (values checked by Team)."""
    require(message, "domain", "name", "standby_mac", "pool")
    return TeamRequest(
        name=message.name,
        standby_mac=message.standby_mac,
        pool=message.pool,
        mac_policy=message.mac_policy or MacPolicy.PRESERVE,  # checked by Team
        team_mac=message.team_mac or None,
        primary_alias=message.primary_alias or None,
    )


def pool_definition(message: Any) -> Pool:
    """The Pool a DefinePoolRequest describes; DomainModelError (a ValueError) if wrong."""
    require(message, "name", "kind")
    return make_pool(
        message.name,
        message.kind,
        bridge=message.bridge,
        model=message.model,
        slots=[TapSlot(s.tap, s.mac) for s in message.slots],
        addresses=message.addresses,
        pf=message.pf,
        vf_addresses=message.vf_addresses,
        state_copy=message.state_copy,
        mdev_type=message.mdev_type,
        mdev_uuids=message.mdev_uuids,
    )


def outcome_enum(outcome: str | None) -> Any:
    """The Outcome enum for an outcome as the workflow or journal spells it (UNSPECIFIED
    for none, or for one the contract has no value for, like a refused migration's)."""
    try:
        return _OUTCOMES.get(Outcome(outcome or ""), pb.OUTCOME_UNSPECIFIED)
    except ValueError:
        return pb.OUTCOME_UNSPECIFIED


def event_message(event: Event) -> Any:
    message = pb.WorkflowEvent(
        workflow_id=event.workflow_id,
        phase=event.phase,
        state=event.state,
        message=event.message,
        at=event.at,
    )
    if event.fraction is not None:
        message.fraction = event.fraction
    return message


def report_message(report: MigrationReport) -> Any:
    return pb.MigrationReport(
        workflow_id=report.workflow_id,
        domain=report.domain,
        source_uri=report.source_uri,
        destination_uri=report.destination_uri,
        outcome=outcome_enum(report.outcome),
        outcome_text=str(report.outcome),
        phases=[
            pb.PhaseTiming(name=p.name, seconds=p.seconds, detail=p.detail) for p in report.phases
        ],
        teams={str(k): str(v) for k, v in report.teams.items()},
        error=report.error,
        migration_json=details_json(report.migration) if report.migration else "{}",
        drift=dict(report.drift),
        ways=dict(report.ways),
        devices=dict(report.devices),
        cancelled=report.cancelled,
    )


def report_from_message(message: Any) -> MigrationReport:
    """The report a Migrate stream's last event carries, for a client in Python (the
    lab's soak): :func:`report_message` read back, but for what the contract does not
    carry (the phases' start times, ``why``, ``binds``).  ValueError for an outcome or a
    team mode it does not know."""
    migration = json.loads(message.migration_json or "{}")
    return MigrationReport(
        workflow_id=message.workflow_id,
        domain=message.domain,
        source_uri=message.source_uri,
        destination_uri=message.destination_uri,
        outcome=Outcome(message.outcome_text),
        phases=[PhaseTiming(p.name, p.seconds, p.detail) for p in message.phases],
        teams={k: TeamMode(v) for k, v in message.teams.items()},
        error=message.error,
        migration=from_plain(MigrationStats, migration) if migration else None,
        drift=dict(message.drift),
        cancelled=message.cancelled,
        ways=dict(message.ways),
        devices=dict(message.devices),
    )


def cancel_message(result: CancelResult) -> Any:
    return pb.CancelResponse(
        workflow_id=result.workflow_id,
        domain=result.domain,
        phase=result.phase,
        accepted=result.accepted,
        ended=result.ended,
        outcome=outcome_enum(None if result.outcome is None else str(result.outcome)),
        outcome_text="" if result.outcome is None else str(result.outcome),
        cancelled=result.cancelled,
        message=result.message,
    )


def cancel_wait(message: Any) -> float:
    """CancelRequest.wait_seconds, checked: a finite number of seconds, at most a day."""
    wait = float(message.wait_seconds)
    if not math.isfinite(wait) or not 0 <= wait <= 86_400:
        raise ValueError(f"CancelRequest.wait_seconds {wait} is not within 0..86400")
    return wait


def final_event(report: MigrationReport) -> Any:
    """The last message of a Migrate stream: phase "report", state = the outcome."""
    return pb.WorkflowEvent(
        workflow_id=report.workflow_id,
        phase="report",
        state=str(report.outcome),
        message=report.error or f"{report.domain}: {report.outcome}",
        at=time.time(),
        report=report_message(report),
    )


def evacuation_event_message(event: EvacuationEvent) -> Any:
    message = pb.EvacuationEvent(
        domain=event.domain,
        destination_uri=event.destination_uri,
        phase=event.phase,
        state=event.state,
        outcome=event.outcome,
        message=event.message,
        workflow_id=event.workflow_id,
        at=event.at,
    )
    if event.fraction is not None:
        message.fraction = event.fraction
    return message


def domain_evacuation_message(result: DomainEvacuation) -> Any:
    message = pb.DomainEvacuation(
        domain=result.domain,
        uuid=result.uuid,
        destination_uri=result.destination_uri,
        outcome=str(result.outcome),
        error=result.error,
        started_at=result.started_at,
        seconds=result.seconds,
    )
    if result.report is not None:
        message.report.CopyFrom(report_message(result.report))
    return message


def evacuation_report_message(report: EvacuationReport) -> Any:
    return pb.EvacuationReport(
        source_uri=report.source_uri,
        parallel=report.parallel,
        wall_s=report.wall_s,
        domains=[domain_evacuation_message(d) for d in report.domains],
    )


def final_evacuation_event(report: EvacuationReport) -> Any:
    """The last message of an Evacuate stream: phase "report", the summary in its report."""
    counts: dict[str, int] = {}
    for d in report.domains:
        counts[str(d.outcome)] = counts.get(str(d.outcome), 0) + 1
    return pb.EvacuationEvent(
        phase="report",
        state="ended",
        message=", ".join(f"{n} {o}" for o, n in counts.items()) or "no domains",
        at=time.time(),
        report=evacuation_report_message(report),
    )


def primary_message(primary: PrimaryDevice | None) -> Any:
    """A PrimaryDevice message; None for no primary (the field stays unset)."""
    if primary is None:
        return None
    return pb.PrimaryDevice(
        kind=primary.kind,
        alias=primary.alias,
        mac=primary.mac or "",
        pci_address=primary.pci_address or "",
        network=primary.network or "",
        tap=primary.tap or "",
    )


def team_status_message(team: TeamStatus) -> Any:
    return pb.TeamStatus(
        name=team.name,
        mode=_TEAM_MODES[team.mode],
        mode_text=str(team.mode),
        active_member=team.active_member,
        detail=team.detail,
        pool=team.pool,
        mac_policy=team.mac_policy,
        primary=primary_message(team.primary),
        members=list(team.members),
        drift=team.drift,
        way=team.way,
        case=team.case,
        managed_by_guest=team.managed_by_guest,
        last_event=guest_event_message(team.last_event),
    )


def guest_event_message(event: GuestEvent | None) -> Any:
    """A GuestTeamEvent message; None for no event (the field stays unset)."""
    if event is None:
        return None
    return pb.GuestTeamEvent(
        kind=event.kind,
        device=event.device,
        reason=event.reason,
        ok=event.ok,
        detail=event.detail,
        unix_ms=event.unix_ms,
    )


def status_message(status: DomainStatus) -> Any:
    return pb.GetStatusResponse(
        domain=status.domain,
        uri=status.uri,
        teams=[team_status_message(t) for t in status.teams],
        open_workflow_id=status.open_workflow_id,
        details_json=details_json(status),
        uuid=status.uuid,
        agent_error=status.agent_error,
        devices=dict(status.devices),
    )


def pool_message(pool: PoolStatus) -> Any:
    return pb.Pool(
        name=pool.name,
        kind=str(pool.kind),
        total=pool.total,
        free=pool.free or 0,
        free_devices=list(pool.free_devices),
        details_json=details_json(pool),
        error=pool.error,
    )


def recover_result(result: RecoverResult) -> Any:
    return pb.RecoverResult(
        workflow_id=result.workflow_id,
        domain=result.domain,
        action=result.action,
        outcome=outcome_enum(result.outcome),
        outcome_text="" if result.outcome is None else str(result.outcome),
        error=result.error,
        details_json=details_json(result),
        detail=result.detail,
    )


def failover_message(result: FailoverResult) -> Any:
    return pb.FailoverResponse(
        workflow_id=result.workflow_id,
        domain=result.domain,
        to=_TEAM_MODES[result.to],
        teams={name: str(mode) for name, mode in result.teams.items()},
        why=result.why,
    )


def team_message(team: Team) -> Any:
    return pb.Team(
        name=team.name,
        standby_mac=team.standby_mac,
        pool=team.pool,
        mac_policy=team.mac_policy,
        team_mac=team.team_mac or "",
        primary=primary_message(team.primary),
    )


def teams_message(teams: DomainTeams) -> Any:
    return pb.GetTeamsResponse(
        domain=teams.domain,
        uuid=teams.uuid,
        teams=[team_message(t) for t in teams.teams],
        cases=dict(teams.cases),
        drift=dict(teams.drift),
    )


def workflow_summary(row: WorkflowSummary) -> Any:
    return pb.WorkflowSummary(
        id=row.id,
        kind=row.kind,
        domain_uuid=row.domain_uuid,
        domain_name=row.domain_name,
        source_uri=row.source_uri,
        destination_uri=row.destination_uri,
        state=row.state,
        outcome=outcome_enum(row.outcome or None),
        outcome_text=row.outcome,
        created=row.created,
        updated=row.updated,
        owner_alive=row.owner_alive,
        report_json=row.report_json,
    )


def details_json(value: object) -> str:
    """A ``details_json`` field: the answer's JSON form, compact."""
    return json.dumps(plain(value), default=str, separators=(",", ":"))
