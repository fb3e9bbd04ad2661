"""A workflow run on one domain: its journal record opened, the domain's lease taken, the
workflow run, the lease given back and the record closed, refused if the lease is held.
``migrate`` and ``failover``; the steps themselves are in ``migration.py`` and ``guest.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict

from host.domain.teams import Team
from host.logfields import log_fields
from host.workflow.guest import GuestOnHost, PreflightError, WorkflowError, to_primary
from host.workflow.journal import WorkflowKind
from host.workflow.lease import LeaseHeld
from host.workflow.migration import BIND_TIMEOUT, SWITCH_TIMEOUT, MigrationWorkflow
from host.workflow.model import (
    Event,
    FailoverResult,
    MigrationReport,
    MigrationRequest,
    Outcome,
    TeamMode,
    plain,
)
from host.workflow.observer import notify
from host.workflow.runtime import Runtime, release_lease

log = logging.getLogger(__name__)


def migrate(
    rt: Runtime,
    request: MigrationRequest,
    on_event: Callable[[Event], None],
    interrupted: Callable[[], str],
) -> MigrationReport:
    """Run one migration to its end (``Coordinator.migrate``)."""
    with (
        rt.connect(request.source_uri) as source,
        rt.connect(request.destination_uri) as destination,
    ):
        dom = source.domain(request.domain)
        workflow_id = rt.journal.begin(
            "migrate",
            dom.uuid,
            dom.name,
            request.source_uri,
            request.destination_uri,
            asdict(request),
        )
        lease = rt.lease(workflow_id, WorkflowKind.MIGRATE)
        try:
            lease.take(dom)
        except Exception as exc:
            rt.journal.finish(workflow_id, Outcome.REFUSED, {"error": str(exc)})
            raise

        def cancelled() -> str:
            asked = interrupted()
            if asked:
                return asked
            found = rt.journal.cancel_request(workflow_id)
            return found.requested_by if found is not None else ""

        try:
            with log_fields(domain=dom.name, workflow=workflow_id):
                report = MigrationWorkflow(
                    request,
                    rt.journal,
                    workflow_id,
                    source,
                    destination,
                    on_event,
                    rt.agent_for,
                    cancelled=cancelled,
                    lease=lease,
                ).run()
        except PreflightError as exc:
            release_lease(lease, dom.uuid, source, destination)
            rt.journal.finish(workflow_id, Outcome.REFUSED, {"error": str(exc)})
            raise
        except Exception as exc:
            release_lease(lease, dom.uuid, source, destination)
            rt.journal.finish(workflow_id, Outcome.FAILED, {"error": str(exc)})
            failed = MigrationReport(
                workflow_id,
                dom.name,
                request.source_uri,
                request.destination_uri,
                Outcome.FAILED,
                error=str(exc),
            )
            notify(rt.observer.migration_finished, failed)  # a raised failure counts too
            raise
        release_lease(lease, dom.uuid, source, destination)
        rt.journal.finish(workflow_id, report.outcome, plain(report))
        notify(rt.observer.migration_finished, report)
        return report


def failover(rt: Runtime, uri: str, domain: str, to: TeamMode) -> FailoverResult:
    """Move every team to its standby or back to a primary, without migrating."""
    if to not in (TeamMode.STANDBY, TeamMode.PRIMARY):
        raise WorkflowError(f"failover goes to standby or primary, not {to!r}")
    with rt.connect(uri) as hv:
        guest = GuestOnHost(hv, domain, rt.agent_for)
        workflow_id = rt.journal.begin(
            "failover", guest.uuid, guest.name, uri, uri, {"to": str(to)}
        )
        result: dict[str, TeamMode] = {}
        why: dict[str, str] = {}
        outcome = Outcome.FAILED
        lease = rt.lease(workflow_id, WorkflowKind.FAILOVER)
        try:
            try:
                lease.take(guest.dom)
            except LeaseHeld:
                outcome = Outcome.REFUSED
                raise
            for team in guest.teams().teams:
                op = f"{workflow_id}:{to}:{team.name}"
                rt.journal.record(workflow_id, f"{to}:{team.name}", "started", {})
                if to == TeamMode.STANDBY:
                    guest.agent().use_standby(
                        team.name,
                        release_primary=False,
                        operation_id=op,
                        timeout=SWITCH_TIMEOUT,
                    )
                    result[team.name] = TeamMode.STANDBY
                else:
                    said: list[str] = []
                    result[team.name] = to_primary(
                        guest, team, op, BIND_TIMEOUT, _said_and_logged(said)
                    )
                    if result[team.name] is not TeamMode.PRIMARY and said:
                        why[team.name] = said[-1]
                rt.journal.record(
                    workflow_id, f"{to}:{team.name}", "done", {"result": result[team.name]}
                )
            outcome = Outcome.DONE
        finally:
            guest.close()
            if outcome is not Outcome.REFUSED:
                lease.release(guest.dom)
            rt.journal.finish(
                workflow_id, outcome, {"teams": result, **({"why": why} if why else {})}
            )
        return FailoverResult(workflow_id, guest.name, to, result, why)


def team_to_primary(guest: GuestOnHost, team: Team, operation_id: str) -> TeamMode:
    """*team* on a primary, plugging one if needed: PRIMARY, or STANDBY if none."""
    return to_primary(guest, team, operation_id, BIND_TIMEOUT, log.info)


def _said_and_logged(said: list[str]) -> Callable[[str], None]:
    """An emit that logs what a team operation says and keeps it for the caller's result."""

    def emit(message: str) -> None:
        log.info("%s", message)
        said.append(message)

    return emit
