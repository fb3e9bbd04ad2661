"""A workflow run on one domain: its journal record opened, the domain's lease taken on
its :class:`~host.workflow.guest.Guest`, the workflow run, the lease given back and the
record closed, refused if the lease is held.  ``migrate`` and ``failover``; the steps
themselves are in ``migration.py`` and the team operations on ``guest.py``'s Guest.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict

from host.logfields import log_fields
from host.workflow.errors import PreflightError, WorkflowError
from host.workflow.guest import BIND_TIMEOUT, SWITCH_TIMEOUT
from host.workflow.journal import WorkflowKind
from host.workflow.lease import LeaseHeld
from host.workflow.migration import MigrationWorkflow
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
from host.workflow.runtime import Runtime

log = logging.getLogger(__name__)


def migrate(
    rt: Runtime,
    request: MigrationRequest,
    on_event: Callable[[Event], None],
    interrupted: Callable[[], str],
) -> MigrationReport:
    """Run one migration to its end (``Coordinator.migrate``)."""
    with (
        rt.connect(request.source_uri) as source_hv,
        rt.connect(request.destination_uri) as destination_hv,
    ):
        source = rt.guest(source_hv, request.domain)
        workflow_id = rt.journal.begin(
            "migrate",
            source.uuid,
            source.name,
            request.source_uri,
            request.destination_uri,
            asdict(request),
        )
        try:
            source.take_lease(rt.lease(workflow_id, WorkflowKind.MIGRATE))
        except Exception as exc:
            rt.journal.finish(workflow_id, Outcome.REFUSED, {"error": str(exc)})
            raise

        def cancelled() -> str:
            asked = interrupted()
            if asked:
                return asked
            found = rt.journal.cancel_request(workflow_id)
            return found.requested_by if found is not None else ""

        lease = source.lease

        try:
            with log_fields(domain=source.name, workflow=workflow_id):
                report = MigrationWorkflow(
                    request,
                    rt.journal,
                    workflow_id,
                    source,
                    destination_hv,
                    rt.guest,
                    on_event,
                    cancelled=cancelled,
                ).run()  # gives the lease back, wherever the domain is, as it ends
        except PreflightError as exc:
            rt.journal.finish(workflow_id, Outcome.REFUSED, {"error": str(exc)})
            raise
        except Exception as exc:
            rt.journal.finish(workflow_id, Outcome.FAILED, {"error": str(exc)})
            failed = MigrationReport(
                workflow_id,
                source.name,
                request.source_uri,
                request.destination_uri,
                Outcome.FAILED,
                error=str(exc),
            )
            notify(rt.observer.migration_finished, failed)  # a raised failure counts too
            raise
        finally:
            if lease is not None:
                rt.release_lease_where_lost(lease, source.uuid, source_hv, destination_hv)
        rt.journal.finish(workflow_id, report.outcome, plain(report))
        notify(rt.observer.migration_finished, report)
        return report


def failover(rt: Runtime, uri: str, domain: str, to: TeamMode) -> FailoverResult:
    """Move every team to its standby or back to a primary, without migrating."""
    if to not in (TeamMode.STANDBY, TeamMode.PRIMARY):
        raise WorkflowError(f"failover goes to standby or primary, not {to!r}")
    with rt.connect(uri) as hv:
        guest = rt.guest(hv, domain)
        workflow_id = rt.journal.begin(
            "failover", guest.uuid, guest.name, uri, uri, {"to": str(to)}
        )
        result: dict[str, TeamMode] = {}
        why: dict[str, str] = {}
        outcome = Outcome.FAILED
        try:
            try:
                guest.take_lease(rt.lease(workflow_id, WorkflowKind.FAILOVER))
            except LeaseHeld:
                outcome = Outcome.REFUSED
                raise
            teams = guest.teams().teams
            if to == TeamMode.STANDBY:
                for team in teams:
                    op = f"{workflow_id}:{to}:{team.name}"
                    rt.journal.record(workflow_id, f"{to}:{team.name}", "started", {})
                    guest.use_standby(team, op, SWITCH_TIMEOUT, release_primary=False)
                    result[team.name] = TeamMode.STANDBY
                    rt.journal.record(
                        workflow_id, f"{to}:{team.name}", "done", {"result": result[team.name]}
                    )
            else:  # every team's device plugged in one step, the binds together
                for team in teams:
                    rt.journal.record(workflow_id, f"{to}:{team.name}", "started", {})
                said: list[str] = []
                bound = guest.to_primaries(
                    teams,
                    lambda name: f"{workflow_id}:{to}:{name}",
                    BIND_TIMEOUT,
                    _said_and_logged(said),
                )
                for name, got in bound.items():
                    result[name] = got.result
                    if got.result is not TeamMode.PRIMARY:
                        why[name] = _last_said_of(said, name) or got.detail
                    rt.journal.record(workflow_id, f"{to}:{name}", "done", {"result": got.result})
            outcome = Outcome.DONE
        finally:
            guest.close()
            guest.release_lease()  # only if taken
            rt.journal.finish(
                workflow_id, outcome, {"teams": result, **({"why": why} if why else {})}
            )
        return FailoverResult(workflow_id, guest.name, to, result, why)


def _last_said_of(said: list[str], team: str) -> str:
    """The last thing said of *team* (team operations say ``team NAME: ...``)."""
    return next((m for m in reversed(said) if m.startswith(f"team {team}:")), "")


def _said_and_logged(said: list[str]) -> Callable[[str], None]:
    """An emit that logs what a team operation says and keeps it for the caller's result."""

    def emit(message: str) -> None:
        log.info("%s", message)
        said.append(message)

    return emit
