"""``ptmig``'s text: each Coordinator answer as a person reads it (``--json`` prints the
answer's one JSON form instead, ``model.plain``)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from host.workflow.model import (
        CancelResult,
        DomainStatus,
        DomainTeams,
        EvacuationReport,
        FailoverResult,
        GuestEvent,
        MigrationReport,
        PoolStatus,
        RecoverResult,
        WorkflowSummary,
    )


def teams_text(teams: DomainTeams) -> str:
    lines = []
    for t in teams.teams:
        lines.append(
            f"{t.name}: standby {t.standby_mac}, pool {t.pool}, policy {t.mac_policy}, "
            f"primary {t.primary.alias if t.primary else None}"
        )
        if teams.drift.get(t.name):
            lines.append(f"  drift: {teams.drift[t.name]}")
    return "\n".join(lines) or "no teams"


def status_text(status: DomainStatus) -> str:
    lines = [f"{status.domain} ({status.uuid})"]
    if status.open_workflow_id:
        lines.append(f"  open workflow {status.open_workflow_id}")
    for team in status.teams:
        primary = team.primary.alias if team.primary else "-"
        lines.append(
            f"  team {team.name}: on {team.mode}, active {team.active_member or '-'}, "
            f"primary {primary}, pool {team.pool}, MAC policy {team.mac_policy}"
        )
        if team.drift:
            lines.append(f"    drift: {team.drift}")
        if team.way:
            lines.append(f"    way: {team.way}")
        if team.managed_by_guest:
            lines.append(f"    managed by the guest's agent; {guest_event_text(team.last_event)}")
    for uuid, way in status.devices.items():  # mediated devices (host/workflow/hybrid.py)
        lines.append(f"  mdev {uuid}: {way}")
    if status.agent_error:
        lines.append(f"  agent: {status.agent_error}")
    return "\n".join(lines)


def guest_event_text(event: GuestEvent | None) -> str:
    """What a guest-managed team's agent last did on its own, in one line."""
    if event is None:
        return "nothing done on its own since the agent started"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(event.unix_ms / 1000))
    outcome = event.detail if event.ok else f"failed: {event.detail}"
    return f"last event {event.kind} {event.device} at {when} UTC: {event.reason}; {outcome}"


def pools_text(pools: list[PoolStatus]) -> str:
    lines = []
    for p in pools:
        free = "?" if p.free is None else p.free
        error = f" ({p.error})" if p.error else ""
        lines.append(f"{p.name:<16} {p.kind:<14} free {free} of {p.total}{error}")
    return "\n".join(lines) or "no pools"


def failover_text(result: FailoverResult) -> str:
    return "\n".join(
        f"{team}: {on}" + (f" ({result.why[team]})" if team in result.why else "")
        for team, on in result.teams.items()
    )


def recover_text(results: list[RecoverResult]) -> str:
    lines = [
        f"{r.workflow_id} {r.domain}: {r.action} {r.detail or r.error}".rstrip() for r in results
    ]
    return "\n".join(lines) or "nothing to recover"


def workflows_text(rows: list[WorkflowSummary]) -> str:
    lines = [
        f"{r.id} {r.kind:<13} {r.domain_name:<20} {r.state:<6} {r.outcome}".rstrip() for r in rows
    ]
    return "\n".join(lines) or "no workflows"


def cancel_text(result: CancelResult) -> str:
    return result.message


def evacuation_text(report: EvacuationReport) -> str:
    lines = [
        f"{d.domain:<20} {d.destination_uri or '-':<28} {d.outcome:<14} {d.seconds:7.2f} s"
        + (f"  {d.error}" if d.error else "")
        for d in report.domains
    ]
    counts: dict[str, int] = {}
    for d in report.domains:
        counts[str(d.outcome)] = counts.get(str(d.outcome), 0) + 1
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "no domains"
    lines.append(
        f"{report.source_uri}: {summary} in {report.wall_s:.1f} s ({report.parallel} at a time)"
    )
    return "\n".join(lines)


def report_text(report: MigrationReport) -> str:
    cancelled = " (cancelled)" if report.cancelled else ""
    lines = [
        f"{report.domain}: {report.outcome}{cancelled}"
        + (f" ({report.error})" if report.error else "")
    ]
    lines += [f"  {p.name:<10} {p.seconds:7.2f} s  {p.detail}" for p in report.phases]
    for team, on in report.teams.items():
        case = report.drift.get(team, "plugged")
        lines.append(f"  team {team}: on {on}" + ("" if case == "plugged" else f" (was {case})"))
        if team in report.ways:  # the hybrid path was in play (host/workflow/hybrid.py)
            lines.append(f"    {report.ways[team]}")
    for uuid, way in report.devices.items():  # mediated devices, carried by a state copy
        lines.append(f"  mdev {uuid}: {way}")
    return "\n".join(lines)
