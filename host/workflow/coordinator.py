"""The coordinator: what the faces (``ptmig``, ``ptmigd``) ask for, one method each.

It opens the hypervisor connections, takes the per-domain lock in the journal (an open
workflow for a domain refuses a second one, across processes), runs the workflow and
closes the record.  ``recover`` finishes what a killed coordinator left open and the
reconciler repairs degraded teams; both use the same team operations as a migration.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

from host.agent_client import AgentClient
from host.domain.devices import primary_of_device
from host.domain.domain_xml import DomainInfo, parse_domain
from host.domain.errors import UnknownName
from host.domain.pools import (
    POOL_NETWORK_PREFIX,
    EmulatedPool,
    PciPool,
    PciSlot,
    Pool,
    PoolKind,
    Slot,
    VfSlot,
    format_pool_network,
    free_slots,
    parse_pool_network,
    pool_network_name,
)
from host.domain.teams import PrimaryDevice, Team, TeamSet
from host.hypervisor import Domain, Hypervisor, HypervisorError
from host.logfields import log_fields
from host.workflow.drift import TeamCase
from host.workflow.evacuation import Evacuation
from host.workflow.guest import (
    AgentFactory,
    GuestOnHost,
    PreflightError,
    WorkflowError,
    serial_agent,
    to_primary,
)
from host.workflow.journal import (
    Journal,
    JournalError,
    WorkflowClosed,
    WorkflowKind,
    WorkflowRecord,
    boot_id_now,
)
from host.workflow.lease import SETTLE_S, DomainLease, LeaseHeld
from host.workflow.migration import BIND_TIMEOUT, SWITCH_TIMEOUT, MigrationWorkflow
from host.workflow.model import (
    STILL_RUNNING,
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
    Outcome,
    PoolStatus,
    RecoverResult,
    RepairResult,
    TeamMode,
    TeamRequest,
    TeamStatus,
    WorkflowSummary,
    plain,
)
from host.workflow.observer import HostPass, NoObserver, Observer, PoolUse, notify

log = logging.getLogger(__name__)

#: How long ``recover`` waits for a migration a killed coordinator left running.
RECOVER_JOB_WAIT = 300.0
#: How long ``cancel`` waits, by default, for the workflow to have rolled back.
CANCEL_WAIT = 300.0
#: Steps after which a migration cannot be cancelled: the VM has moved.
PAST_NO_RETURN = frozenset({"bind", "verify"})


class NothingToCancel(WorkflowError, LookupError):
    """The domain has no running migration to cancel; nothing was changed."""

    code = "NOT_FOUND"


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
        self.journal = journal
        self.connect = connect
        self._agent_for = agent_for
        self.observer: Observer = observer or NoObserver()
        #: Fischer's wait when taking a domain's lease (host/workflow/lease.py); the
        #: fakes' unit tests set 0.
        self.lease_settle = SETTLE_S

    def agent_for(self, dom: Domain, timeout: float) -> AgentClient:
        """The workflow's agent client, its calls told to the observer."""
        client = self._agent_for(dom, timeout)
        client.on_call = lambda rpc, seconds, error: notify(
            self.observer.agent_call, rpc, seconds, error
        )
        return client

    # -- migration -------------------------------------------------------------------

    def migrate(
        self,
        request: MigrationRequest,
        on_event: Callable[[Event], None] = _ignore,
        interrupted: Callable[[], str] = _never,
    ) -> MigrationReport:
        """Run one migration to its end.  *interrupted* says who cancelled it in this
        process ("SIGINT"; "" while nobody has); ``cancel`` asks through the journal."""
        with (
            self.connect(request.source_uri) as source,
            self.connect(request.destination_uri) as destination,
        ):
            dom = source.domain(request.domain)
            workflow_id = self.journal.begin(
                "migrate",
                dom.uuid,
                dom.name,
                request.source_uri,
                request.destination_uri,
                asdict(request),
            )
            lease = self._lease(workflow_id, WorkflowKind.MIGRATE)
            try:
                lease.take(dom)
            except Exception as exc:
                self.journal.finish(workflow_id, "refused", {"error": str(exc)})
                raise

            def cancelled() -> str:
                asked = interrupted()
                if asked:
                    return asked
                found = self.journal.cancel_request(workflow_id)
                return found.requested_by if found is not None else ""

            try:
                with log_fields(domain=dom.name, workflow=workflow_id):
                    report = MigrationWorkflow(
                        request,
                        self.journal,
                        workflow_id,
                        source,
                        destination,
                        on_event,
                        self.agent_for,
                        cancelled=cancelled,
                        lease=lease,
                    ).run()
            except PreflightError as exc:
                self._release(lease, source, destination, dom.uuid)
                self.journal.finish(workflow_id, "refused", {"error": str(exc)})
                raise
            except Exception as exc:
                self._release(lease, source, destination, dom.uuid)
                self.journal.finish(workflow_id, str(Outcome.FAILED), {"error": str(exc)})
                failed = MigrationReport(
                    workflow_id,
                    dom.name,
                    request.source_uri,
                    request.destination_uri,
                    Outcome.FAILED,
                    error=str(exc),
                )
                notify(self.observer.migration_finished, failed)  # a raised failure counts too
                raise
            self._release(lease, source, destination, dom.uuid)
            self.journal.finish(workflow_id, str(report.outcome), plain(report))
            notify(self.observer.migration_finished, report)
            return report

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
        return Evacuation(self, request, on_event, interrupted).run()

    def _lease(self, workflow_id: str, kind: str) -> DomainLease:
        return DomainLease(workflow_id, kind, settle=self.lease_settle)

    @staticmethod
    def _release(lease: DomainLease, *hosts_and_uuid: Any) -> None:
        """Give the lease back on whichever host holds the domain now."""
        *hosts, uuid = hosts_and_uuid
        for hv in hosts:
            try:
                if hv.has_domain(uuid):
                    lease.release(hv.domain(uuid))
            except HypervisorError as exc:
                log.warning("lease: %s: %s", hv.uri, exc)

    def cancel(
        self, domain: str, *, requested_by: str = "", wait: float = CANCEL_WAIT
    ) -> CancelResult:
        """Stop *domain*'s running migration, whichever process runs it on this journal.

        Before the point of no return the cancel is recorded in the journal, where the
        workflow looks for it (it aborts the libvirt job and rolls back); this waits up
        to *wait* seconds for the workflow to end.  After it, nothing is asked: the VM
        has moved and the bind finishes.  No running migration: :class:`NothingToCancel`.
        """
        record = self._running_migration(domain)
        steps = self.journal.steps(record.id)
        phase = steps[-1].name if steps else "preflight"
        if phase == "cancel":
            phase = steps[-2].name if len(steps) > 1 else "preflight"
        migrated = any(s.name == "migrate" and s.status == "done" for s in steps)
        if migrated or phase in PAST_NO_RETURN:
            return CancelResult(
                record.id,
                record.domain_name,
                phase,
                accepted=False,
                message=(
                    f"too late to cancel: {record.domain_name} has moved to "
                    f"{record.destination_uri}; the bind will finish (workflow {record.id})"
                ),
            )
        who = requested_by or f"ptmig cancel (pid {os.getpid()} on {socket.gethostname()})"
        try:
            self.journal.request_cancel(record.id, who)
        except WorkflowClosed as exc:
            raise NothingToCancel(f"{record.domain_name}: {exc}; nothing to cancel") from None
        log.info("cancel of workflow %s (%s) asked by %s at %s", record.id, domain, who, phase)
        deadline = time.monotonic() + wait
        ended = self.journal.get(record.id)
        while ended is not None and ended.is_open and time.monotonic() < deadline:
            time.sleep(0.2)
            ended = self.journal.get(record.id)
        if ended is None or ended.is_open:
            return CancelResult(
                record.id,
                record.domain_name,
                phase,
                accepted=True,
                message=f"cancel of {record.domain_name} requested at {phase}; "
                f"workflow {record.id} is stopping",
            )
        report = ended.report or {}
        outcome = _outcome(ended.outcome)
        cancelled = bool(report.get("cancelled"))
        if cancelled:
            message = f"{record.domain_name}: cancelled at {phase}, {ended.outcome}"
            if outcome is Outcome.ROLLED_BACK:
                message += f": it runs on {record.source_uri} with its teams as before"
            elif report.get("error"):
                message += f": {report['error']}"
        elif outcome in (Outcome.DONE, Outcome.DONE_DEGRADED):
            message = (
                f"too late to cancel: {record.domain_name} had moved to "
                f"{record.destination_uri}; the bind finished ({ended.outcome})"
            )
        else:
            message = f"{record.domain_name}: the workflow ended {ended.outcome} before the cancel"
        return CancelResult(
            record.id,
            record.domain_name,
            phase,
            accepted=True,
            ended=True,
            outcome=outcome,
            cancelled=cancelled,
            message=message,
        )

    def _running_migration(self, domain: str) -> WorkflowRecord:
        if not domain:
            raise NothingToCancel("cancel: which domain?")
        mine = [
            w for w in self.journal.open_workflows() if domain in (w.domain_uuid, w.domain_name)
        ]
        if not mine:
            raise NothingToCancel(
                f"{domain} has no running workflow in journal {self.journal.path}; "
                "nothing to cancel, nothing changed"
            )
        record = mine[0]
        if record.kind is not WorkflowKind.MIGRATE:
            raise NothingToCancel(
                f"{domain}'s open workflow {record.id} is a {record.kind}; only a migration "
                "can be cancelled (nothing changed)"
            )
        # An owner on another machine (a shared journal) cannot be asked whether it runs.
        here = record.owner_boot_id in (None, boot_id_now())
        if here and not self.journal.is_owner_alive(record):
            raise NothingToCancel(
                f"{domain}'s workflow {record.id} is not running: its coordinator "
                f"(pid {record.owner_pid}) is gone; run 'ptmig recover' (nothing changed)"
            )
        return record

    # -- maintenance -----------------------------------------------------------------

    def failover(self, uri: str, domain: str, to: TeamMode) -> FailoverResult:
        """Move every team to its standby or back to a primary, without migrating."""
        if to not in (TeamMode.STANDBY, TeamMode.PRIMARY):
            raise WorkflowError(f"failover goes to standby or primary, not {to!r}")
        with self.connect(uri) as hv:
            guest = GuestOnHost(hv, domain, self.agent_for)
            workflow_id = self.journal.begin(
                "failover", guest.uuid, guest.name, uri, uri, {"to": str(to)}
            )
            result: dict[str, str] = {}
            why: dict[str, str] = {}
            outcome = "failed"
            lease = self._lease(workflow_id, WorkflowKind.FAILOVER)
            try:
                try:
                    lease.take(guest.dom)
                except LeaseHeld:
                    outcome = "refused"
                    raise
                for team in guest.teams().teams:
                    op = f"{workflow_id}:{to}:{team.name}"
                    self.journal.record(workflow_id, f"{to}:{team.name}", "started", {})
                    if to == TeamMode.STANDBY:
                        guest.agent().use_standby(
                            team.name,
                            release_primary=False,
                            operation_id=op,
                            timeout=SWITCH_TIMEOUT,
                        )
                        result[team.name] = str(TeamMode.STANDBY)
                    else:
                        said: list[str] = []
                        result[team.name] = to_primary(
                            guest, team, op, BIND_TIMEOUT, _said_and_logged(said)
                        )
                        if result[team.name] != str(TeamMode.PRIMARY) and said:
                            why[team.name] = said[-1]
                    self.journal.record(
                        workflow_id, f"{to}:{team.name}", "done", {"result": result[team.name]}
                    )
                outcome = "done"
            finally:
                guest.close()
                if outcome != "refused":
                    lease.release(guest.dom)
                self.journal.finish(
                    workflow_id, outcome, {"teams": result, **({"why": why} if why else {})}
                )
            return FailoverResult(workflow_id, guest.name, to, result, why)

    def _to_primary(self, guest: GuestOnHost, team: Team, operation_id: str) -> str:
        return to_primary(guest, team, operation_id, BIND_TIMEOUT, log.info)

    # -- configuration: teams in a domain's metadata, pools on a host -----------------

    def team_show(self, uri: str, domain: str) -> DomainTeams:
        with self.connect(uri) as hv:
            guest = GuestOnHost(hv, domain, self.agent_for)
            return _domain_teams(guest, guest.info().teams or TeamSet())

    def team_set(self, uri: str, domain: str, request: TeamRequest) -> DomainTeams:
        """Add the team to the domain's metadata, or replace the team of that name."""
        with self.connect(uri) as hv:
            guest = GuestOnHost(hv, domain, self.agent_for)
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
            with self._journaled(
                WorkflowKind.TEAM_SET, guest.uuid, guest.name, uri, plain(request)
            ):
                guest.save_teams(teams)
            return _domain_teams(guest, teams)

    def team_remove(self, uri: str, domain: str, team: str) -> DomainTeams:
        with self.connect(uri) as hv:
            guest = GuestOnHost(hv, domain, self.agent_for)
            teams = guest.info().teams or TeamSet()
            remaining = TeamSet(tuple(t for t in teams.teams if t.name != team))
            if len(remaining.teams) == len(teams.teams):
                raise UnknownName(f"{guest.name} has no team {team!r}")
            with self._journaled(
                WorkflowKind.TEAM_REMOVE, guest.uuid, guest.name, uri, {"team": team}
            ):
                guest.save_teams(remaining)
            return _domain_teams(guest, remaining)

    def pool_define(self, uri: str, pool: Pool) -> PoolStatus:
        """Define *pool* on the host, or redefine the pool of that name; VF networks are
        started (libvirt lists a PF's VFs only then), the others stay inert."""
        xml = format_pool_network(pool)
        with self.connect(uri) as hv:
            with self._journaled(
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
            return pool_status(parse_pool_network(defined), hv.all_domain_xml())

    def pool_undefine(self, uri: str, name: str) -> None:
        network = pool_network_name(name)
        with self.connect(uri) as hv:
            if hv.network_xml(network) is None:
                raise UnknownName(f"{uri} has no pool {name!r}")
            with self._journaled(
                WorkflowKind.POOL_UNDEFINE,
                _pool_subject(name, uri),
                name,
                uri,
                {"network": network},
            ):
                hv.undefine_network(network)

    @contextmanager
    def _journaled(
        self, kind: WorkflowKind, subject: str, name: str, uri: str, request: dict[str, Any]
    ) -> Iterator[str]:
        """A one-call change as a workflow of its own: begun before, closed after."""
        workflow_id = self.journal.begin(kind, subject, name, uri, uri, request)
        try:
            yield workflow_id
        except Exception as exc:
            self.journal.finish(workflow_id, str(Outcome.FAILED), {"error": str(exc)})
            raise
        self.journal.finish(workflow_id, str(Outcome.DONE), {})

    # -- queries -----------------------------------------------------------------------

    def status(self, uri: str, domain: str) -> DomainStatus:
        with self.connect(uri) as hv:
            guest = GuestOnHost(hv, domain, self.agent_for)
            try:
                agent_error = ""
                state = None
                try:
                    state = guest.agent().state()
                except Exception as exc:
                    agent_error = str(exc)
                states = {t.name: t for t in state.teams} if state is not None else {}
                out = []
                for drift in guest.drift(state):  # the same classification as migrate's
                    team = drift.team
                    ts = states.get(team.name)
                    detail = ""
                    if state is None or (ts is None and not drift.degraded):
                        mode = TeamMode.UNKNOWN
                        detail = (
                            f"guest agent: {agent_error}"
                            if agent_error
                            else "the guest agent does not know this team"
                        )
                    elif drift.case is TeamCase.PLUGGED:
                        mode = TeamMode.PRIMARY
                    elif drift.case is TeamCase.ON_STANDBY:
                        mode = TeamMode.STANDBY
                    elif drift.case is TeamCase.UNRECORDED and ts is not None:
                        # plugged by hand: the bond may run on it; the drift line says so
                        bound = ts.active_member and ts.active_member == ts.primary
                        mode = TeamMode.PRIMARY if bound else TeamMode.STANDBY
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
                            members=tuple(ts.members) if ts else (),
                            detail=detail,
                            case=str(drift.case),
                            drift=drift.message if drift.drifted else "",
                        )
                    )
                open_workflow = self.journal.open_for_domain(guest.uuid)
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

    def pools(self, uri: str) -> list[PoolStatus]:
        with self.connect(uri) as hv:
            domains = hv.all_domain_xml()
            out = [pool_status(parse_pool_network(xml), domains) for _, xml in pool_networks(hv)]
            for pool in out:
                if pool.free is not None:
                    notify(self.observer.pool_free, uri, pool.name, pool.free, pool.total)
            return out

    def workflows(self, limit: int = 20) -> list[WorkflowSummary]:
        return [
            workflow_summary(w, self.journal.is_owner_alive(w)) for w in self.journal.recent(limit)
        ]

    # -- recovery ----------------------------------------------------------------------

    def recover(self) -> list[RecoverResult]:
        """Finish every open workflow whose coordinator died; leave live ones alone."""
        results = []
        for wf in self.journal.open_workflows():
            try:
                self.journal.adopt(wf.id)  # refuses while the owner still runs
            except JournalError:
                results.append(RecoverResult(wf.id, wf.domain_name, STILL_RUNNING))
                continue
            error = ""
            try:
                if wf.kind in CONFIGURATION_KINDS:
                    outcome, detail = (
                        Outcome.FAILED,
                        (
                            f"a {wf.kind} whose coordinator died: one libvirt call that may or "
                            "may not have been made; check with 'ptmig team-show' or 'ptmig pools'"
                        ),
                    )
                else:
                    outcome, detail = self._recover_one(
                        wf.domain_uuid, wf.source_uri, wf.destination_uri, wf.id
                    )
            except Exception as exc:
                outcome, detail, error = Outcome.FAILED, "", str(exc)
            self.journal.finish(wf.id, str(outcome), {"recovered": True, "detail": detail or error})
            results.append(
                RecoverResult(wf.id, wf.domain_name, str(outcome), outcome, detail, error)
            )
        return results

    def _recover_one(
        self, uuid: str, source_uri: str, destination_uri: str, workflow_id: str
    ) -> tuple[Outcome, str]:
        hosts = [source_uri] if source_uri == destination_uri else [source_uri, destination_uri]
        self._wait_for_jobs(uuid, hosts)
        running = []
        for uri in hosts:
            try:
                with self.connect(uri) as hv:
                    if hv.has_domain(uuid) and hv.domain(uuid).is_active():
                        running.append(uri)
            except HypervisorError as exc:
                log.warning("recover: %s unreachable: %s", uri, exc)
        if len(running) != 1:
            return Outcome.FAILED, f"domain runs on {running or 'no host'}; check by hand"
        uri = running[0]
        teams = self._repair(uri, uuid, f"{workflow_id}:recover", workflow_id, "recover")
        where = "source" if uri == source_uri else "destination"
        if uri == source_uri and source_uri != destination_uri:
            outcome = Outcome.ROLLED_BACK
        elif all(v == "primary" for v in teams.values()):
            outcome = Outcome.DONE
        else:
            outcome = Outcome.DONE_DEGRADED
        return outcome, f"on the {where}; teams {teams}"

    def _wait_for_jobs(
        self, uuid: str, hosts: list[str], timeout: float = RECOVER_JOB_WAIT
    ) -> None:
        """Let a job the dead coordinator started end before looking where the VM runs.

        A peer-to-peer migration runs on inside the source's libvirtd after its client was
        killed; until it ends the VM is active on both hosts (paused on the destination).
        """
        deadline = time.monotonic() + timeout
        for uri in hosts:
            try:
                with self.connect(uri) as hv:
                    if not hv.has_domain(uuid):
                        continue
                    dom = hv.domain(uuid)
                    while dom.is_active() and dom.job_running():
                        if time.monotonic() > deadline:
                            log.warning("recover: %s still has a job on %s", uuid, uri)
                            return
                        time.sleep(0.5)
            except HypervisorError as exc:
                log.warning("recover: %s: %s", uri, exc)

    def _repair(
        self, uri: str, ident: str, op_prefix: str, workflow_id: str, kind: str
    ) -> dict[str, str]:
        """Every team of the domain on *uri* back on a primary where a device is free,
        under the domain's lease (:class:`LeaseHeld` if another workflow has it)."""
        with self.connect(uri) as hv:
            guest = GuestOnHost(hv, ident, self.agent_for)
            lease = self._lease(workflow_id, kind)
            try:
                lease.take(guest.dom)
            except BaseException:
                guest.close()
                raise
            try:
                out = {}
                for drift in guest.drift(guest.agent().state()):
                    name = drift.team.name
                    if drift.case is TeamCase.PLUGGED:
                        out[name] = "primary"
                    elif drift.refused:
                        log.warning("repair of %s: %s", guest.name, drift.summary)
                        out[name] = "standby"
                    else:
                        team = guest.correct_record(drift)
                        out[name] = self._to_primary(guest, team, f"{op_prefix}:{name}")
                return out
            finally:
                guest.close()
                lease.release(guest.dom)

    # -- reconciler ------------------------------------------------------------------

    def reconcile(
        self,
        uri: str,
        stopping: Callable[[], bool] = lambda: False,
    ) -> list[RepairResult]:
        """One pass over *uri*'s running domains with teams: repair the degraded ones.

        *stopping* is asked before each domain, so a shutdown waits for at most the one
        repair in progress and never leaves a journal entry open behind it.
        """
        repaired: list[RepairResult] = []
        degraded = 0
        agents: dict[str, bool] = {}  # domain name -> its agent answered (the observer's)
        with self.connect(uri) as hv:
            candidates = []
            infos = []
            domains_xml = hv.all_domain_xml()
            for xml in domains_xml:
                try:
                    info = parse_domain(xml)
                except Exception:
                    continue
                if info.teams and info.teams.teams:
                    candidates.append(info.uuid)
                    infos.append(info)
            pools = pool_uses(hv, domains_xml, infos)
        for uuid in candidates:
            if stopping():
                break
            with self.connect(uri) as hv:
                if not hv.domain(uuid).is_active():
                    continue
                guest = GuestOnHost(hv, uuid, self.agent_for)
                try:
                    # The same classification as migrate's preflight; a team ptmig cannot
                    # tell the device of is left to a person (the status says why).
                    try:
                        state = guest.agent().state()
                    except Exception:  # no answer, a bad one, or no channel to ask on
                        agents[guest.name] = False
                        raise
                    agents[guest.name] = True
                    drifts = guest.drift(state)
                    needs = [
                        d.team.name
                        for d in drifts
                        if d.case is not TeamCase.PLUGGED and not d.refused
                    ]
                    degraded += sum(1 for d in drifts if d.case is not TeamCase.PLUGGED)
                    for d in drifts:
                        if d.refused:
                            log.warning("reconcile: %s: %s", guest.name, d.summary)
                except Exception as exc:
                    log.info("reconcile: %s: %s", uuid, exc)
                    needs = []
                finally:
                    guest.close()
            if not needs:
                continue
            try:
                workflow_id = self.journal.begin("repair", uuid, uuid, uri, uri, {"teams": needs})
            except Exception as exc:  # another workflow owns the domain now
                log.info("reconcile: %s busy: %s", uuid, exc)
                continue
            try:
                with log_fields(domain=uuid, workflow=workflow_id, phase="repair"):
                    teams = self._repair(
                        uri, uuid, f"{workflow_id}:repair", workflow_id, WorkflowKind.REPAIR
                    )
                self.journal.finish(workflow_id, "done", {"teams": teams})
                repaired.append(RepairResult(workflow_id, uuid, teams))
                degraded -= sum(1 for name in needs if teams.get(name) == "primary")
                outcome = (
                    "repaired"
                    if teams and all(v == "primary" for v in teams.values())
                    else "partly"
                )
                notify(self.observer.repair_finished, uuid, outcome)
            except LeaseHeld as exc:  # another coordinator (another host's) is at it
                log.info("reconcile: %s busy: %s", uuid, exc)
                self.journal.finish(workflow_id, "refused", {"error": str(exc)})
            except Exception as exc:
                self.journal.finish(workflow_id, str(Outcome.FAILED), {"error": str(exc)})
                repaired.append(RepairResult(workflow_id, uuid, error=str(exc)))
                notify(self.observer.repair_finished, uuid, "failed")
        notify(self.observer.degraded_teams, uri, degraded)
        notify(self.observer.host_passed, uri, HostPass(agents, pools))
        return repaired


CONFIGURATION_KINDS = frozenset(
    {
        WorkflowKind.TEAM_SET,
        WorkflowKind.TEAM_REMOVE,
        WorkflowKind.POOL_DEFINE,
        WorkflowKind.POOL_UNDEFINE,
    }
)


def _outcome(text: str | None) -> Outcome | None:
    try:
        return Outcome(text) if text else None
    except ValueError:  # "refused"
        return None


def _pool_subject(name: str, uri: str) -> str:
    """A pool's key in the journal's one-open-workflow-per-subject index."""
    return f"pool {name}@{uri}"


def _domain_teams(guest: GuestOnHost, teams: TeamSet) -> DomainTeams:
    """The record, and where the live domain says otherwise (migrate's classification)."""
    drifts = guest.drift() if teams.teams else ()
    return DomainTeams(
        guest.name,
        guest.uuid,
        teams.teams,
        cases={d.team.name: str(d.case) for d in drifts},
        drift={d.team.name: d.message if d.drifted else "" for d in drifts},
    )


def primary_of(info: DomainInfo, alias: str) -> PrimaryDevice:
    """The team metadata's record of the device *alias* plugged in the domain now."""
    device = info.device(alias)
    if device is None:
        raise UnknownName(f"{info.name} has no device with alias {alias!r}")
    return primary_of_device(alias, device)


def pool_networks(hv: Hypervisor) -> Iterator[tuple[str, str]]:
    """(name, XML) of every pool network of *hv*, by name; one gone since the listing is
    left out."""
    for name in sorted(hv.network_names()):
        if name.startswith(POOL_NETWORK_PREFIX) and (xml := hv.network_xml(name)) is not None:
            yield name, xml


def pool_status(pool: Pool, domains_xml: list[str]) -> PoolStatus:
    """How many of *pool*'s devices there are and which are free on the host whose
    domains' XML *domains_xml* is."""
    if isinstance(pool, PciPool):
        total = len(pool.addresses)
    elif isinstance(pool, EmulatedPool):
        total = len(pool.slots)
    else:
        total = len(pool.vf_addresses)
    try:
        slots = free_slots(pool, domains_xml)
    except Exception as exc:
        return PoolStatus(pool.name, pool.kind, total, None, error=str(exc))
    return PoolStatus(
        pool.name, pool.kind, total, len(slots), tuple(d for d in map(_device_of, slots) if d)
    )


def pool_uses(
    hv: Hypervisor, domains_xml: list[str], infos: list[DomainInfo]
) -> tuple[PoolUse, ...]:
    """Each pool of *hv* with its free devices and the teams of *infos* (the host's domains
    with teams) that name it; empty, with a warning, when the pools cannot be read."""
    using: dict[str, int] = {}
    for info in infos:
        for team in info.teams.teams if info.teams else ():
            using[team.pool] = using.get(team.pool, 0) + 1
    try:
        statuses = [
            pool_status(parse_pool_network(xml), domains_xml) for _, xml in pool_networks(hv)
        ]
    except Exception as exc:
        log.warning("reconcile %s: cannot read its pools: %s", hv.uri, exc)
        return ()
    return tuple(PoolUse(p.name, p.total, p.free, using.get(p.name, 0)) for p in statuses)


def _device_of(slot: Slot) -> str:
    """A free slot's device: a PCI address or a tap; "" for a VF (libvirt picks which)."""
    if isinstance(slot, VfSlot):
        return ""
    return slot.address if isinstance(slot, PciSlot) else slot.tap


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


class Reconciler:
    """Runs :meth:`Coordinator.reconcile` for some hosts, rate-limited, until stopped.

    Rate limit: a pass per host at most every *interval* seconds, and a host whose pass
    failed waits twice as long each time (up to 16 intervals), so a broken host does not
    keep the coordinator busy.
    """

    def __init__(self, coordinator: Coordinator, uris: list[str], interval: float = 10.0):
        self.coordinator = coordinator
        self.uris = uris
        self.interval = interval
        self._stop = threading.Event()
        self._backoff = {uri: 1 for uri in uris}
        self._next = dict.fromkeys(uris, 0.0)
        self._thread: threading.Thread | None = None

    def run_once(self) -> list[RepairResult]:
        out = []
        now = time.monotonic()
        for uri in self.uris:
            if now < self._next[uri] or self._stop.is_set():
                continue
            try:
                out += self.coordinator.reconcile(uri, self._stop.is_set)
                self._backoff[uri] = 1
            except Exception as exc:
                log.warning("reconcile %s: %s", uri, exc)
                self._backoff[uri] = min(self._backoff[uri] * 2, 16)
            self._next[uri] = time.monotonic() + self.interval * self._backoff[uri]
        return out

    def run(self) -> None:
        while not self._stop.wait(1.0):
            for repair in self.run_once():
                log.info("reconciler: %s", repair)

    def start(self) -> None:
        """Run in a thread of its own until :meth:`stop`."""
        self._thread = threading.Thread(target=self.run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop, waiting for a repair in progress: killing it would leave its workflow open."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def _said_and_logged(said: list[str]) -> Callable[[str], None]:
    """An emit that logs what a team operation says and keeps it for the caller's result."""

    def emit(message: str) -> None:
        log.info("%s", message)
        said.append(message)

    return emit
