"""The coordinator: what the faces (``ptmig``, ``ptmigd``) ask for, one method each.

An index: each method hands the shared :class:`~host.workflow.runtime.Runtime` (journal,
connections, agent, observer) to the module that does the work:

    migrate, failover          runs.py           journal record + lease around a workflow
    evacuate                   evacuation.py     plan, then migrate per domain in workers
    cancel                     cancel.py         a cancel request in the journal
    team_*, pool_define/undef. configuration.py  one journaled libvirt call each
    status, pools, workflows   queries.py        answers, nothing changed
    recover                    recovery.py       open workflows of dead coordinators
    reconcile (Reconciler)     reconcile.py      repair degraded teams
"""

from __future__ import annotations

from collections.abc import Callable

from host.agent_client import AgentFactory, serial_agent
from host.domain.pools import Pool
from host.hypervisor import Hypervisor
from host.workflow import (
    cancel,
    configuration,
    evacuation,
    queries,
    reconcile,
    recovery,
    runs,
)
from host.workflow.cancel import CANCEL_WAIT, PAST_NO_RETURN, NothingToCancel
from host.workflow.journal import Journal
from host.workflow.model import (
    CancelResult,
    DomainStatus,
    DomainTeams,
    EvacuationEvent,
    EvacuationReport,
    EvacuationRequest,
    Event,
    FailoverResult,
    MigrationReport,
    MigrationRequest,
    PoolStatus,
    RecoverResult,
    RepairResult,
    TeamMode,
    TeamRequest,
    WorkflowSummary,
)
from host.workflow.observer import NoObserver, Observer
from host.workflow.reconcile import Reconciler
from host.workflow.runtime import Runtime

__all__ = ["CANCEL_WAIT", "PAST_NO_RETURN", "Coordinator", "NothingToCancel", "Reconciler"]


def _never() -> str:
    return ""


def _ignore(_event: Event) -> None:
    pass


def _ignore_evacuation(_event: EvacuationEvent) -> None:
    pass


class Coordinator:
    """*connect* opens a host by URI and *agent_for* reaches a guest's agent: libvirt and
    the virtio-serial channel in production, fakes in the workflow's unit tests."""

    def __init__(
        self,
        journal: Journal,
        connect: Callable[[str], Hypervisor] = Hypervisor,
        agent_for: AgentFactory = serial_agent,
        observer: Observer | None = None,
    ) -> None:
        self.runtime = Runtime(journal, connect, agent_for, observer or NoObserver())

    @property
    def journal(self) -> Journal:
        return self.runtime.journal

    @property
    def connect(self) -> Callable[[str], Hypervisor]:
        return self.runtime.connect

    @property
    def observer(self) -> Observer:
        return self.runtime.observer

    @observer.setter
    def observer(self, observer: Observer) -> None:
        self.runtime.observer = observer

    @property
    def lease_settle(self) -> float:
        """Fischer's wait when taking a domain's lease; the fakes' unit tests set 0."""
        return self.runtime.lease_settle

    @lease_settle.setter
    def lease_settle(self, seconds: float) -> None:
        self.runtime.lease_settle = seconds

    # -- migration -------------------------------------------------------------------

    def migrate(
        self,
        request: MigrationRequest,
        on_event: Callable[[Event], None] = _ignore,
        interrupted: Callable[[], str] = _never,
    ) -> MigrationReport:
        """Run one migration to its end.  *interrupted* says who cancelled it in this
        process ("SIGINT"; "" while nobody has); ``cancel`` asks through the journal."""
        return runs.migrate(self.runtime, request, on_event, interrupted)

    def evacuate(
        self,
        request: EvacuationRequest,
        on_event: Callable[[EvacuationEvent], None] = _ignore_evacuation,
        interrupted: Callable[[], str] = _never,
    ) -> EvacuationReport:
        """Move every running domain with teams off ``request.source_uri`` (with
        ``include_untied`` the others too, by plain libvirt migrations), at most
        ``request.parallel`` at once (capped: ``model.capped_parallel``), each by
        :meth:`migrate`.  *on_event* is called from the worker threads, one event at a
        time; *interrupted* stops new migrations and cancels the running ones.  Refused
        only when no target can be reached; each domain's failure is its own result."""
        return evacuation.Evacuation(
            self.connect, self.migrate, request, on_event, interrupted
        ).run()

    def cancel(
        self, domain: str, *, requested_by: str = "", wait: float = CANCEL_WAIT
    ) -> CancelResult:
        """Stop *domain*'s running migration, whichever process runs it on this journal.

        Before the point of no return the cancel is recorded in the journal, where the
        workflow looks for it (it aborts the libvirt job and rolls back); this waits up
        to *wait* seconds for the workflow to end.  After it, nothing is asked: the VM
        has moved and the bind finishes.  No running migration: :class:`NothingToCancel`.
        """
        return cancel.cancel(self.journal, domain, requested_by=requested_by, wait=wait)

    # -- maintenance -----------------------------------------------------------------

    def failover(self, uri: str, domain: str, to: TeamMode) -> FailoverResult:
        """Move every team to its standby or back to a primary, without migrating."""
        return runs.failover(self.runtime, uri, domain, to)

    def recover(self) -> list[RecoverResult]:
        """Finish every open workflow whose coordinator died; leave live ones alone."""
        return recovery.recover(self.runtime)

    def reconcile(
        self, uri: str, stopping: Callable[[], bool] = lambda: False
    ) -> list[RepairResult]:
        """One pass over *uri*'s running domains with teams: repair the degraded ones;
        *stopping* is asked before each domain."""
        return reconcile.reconcile(self.runtime, uri, stopping)

    # -- configuration: teams in a domain's metadata, pools on a host -----------------

    def team_show(self, uri: str, domain: str) -> DomainTeams:
        return configuration.team_show(self.runtime, uri, domain)

    def team_set(self, uri: str, domain: str, request: TeamRequest) -> DomainTeams:
        """Add the team to the domain's metadata, or replace the team of that name."""
        return configuration.team_set(self.runtime, uri, domain, request)

    def team_remove(self, uri: str, domain: str, team: str) -> DomainTeams:
        return configuration.team_remove(self.runtime, uri, domain, team)

    def pool_define(self, uri: str, pool: Pool) -> PoolStatus:
        """Define *pool* on the host, or redefine the pool of that name."""
        return configuration.pool_define(self.runtime, uri, pool)

    def pool_undefine(self, uri: str, name: str) -> None:
        configuration.pool_undefine(self.runtime, uri, name)

    # -- queries -----------------------------------------------------------------------

    def status(self, uri: str, domain: str) -> DomainStatus:
        return queries.status(self.runtime, uri, domain)

    def pools(self, uri: str) -> list[PoolStatus]:
        return queries.pools(self.runtime, uri)

    def workflows(self, limit: int = 20) -> list[WorkflowSummary]:
        return queries.workflows(self.runtime, limit)
