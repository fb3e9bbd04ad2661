"""The coordinator: what the faces (``ptmig``, ``ptmigd``) ask for, one method each.

It opens the hypervisor connections, takes the per-domain lock in the journal (an open
workflow for a domain refuses a second one, across processes), runs the workflow and
closes the record.  ``recover`` finishes what a killed coordinator left open and the
reconciler repairs degraded teams; both use the same team operations as a migration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from host.domain.domain_xml import parse_domain
from host.domain.pools import free_slots, parse_pool_network
from host.domain.teams import Team
from host.hypervisor import Hypervisor, HypervisorError
from host.workflow.drift import TeamCase
from host.workflow.guest import (
    AgentFactory,
    GuestOnHost,
    PreflightError,
    WorkflowError,
    serial_agent,
    to_primary,
)
from host.workflow.journal import Journal, JournalError
from host.workflow.migration import BIND_TIMEOUT, SWITCH_TIMEOUT, MigrationWorkflow
from host.workflow.model import Event, MigrationReport, MigrationRequest, Outcome

log = logging.getLogger(__name__)

#: How long ``recover`` waits for a migration a killed coordinator left running.
RECOVER_JOB_WAIT = 300.0

POOL_PREFIX = "ptmig-pool-"


def _ignore(_event: Event) -> None:
    pass


class Coordinator:
    """*connect* opens a host by URI and *agent_for* reaches a guest's agent: libvirt and
    the virtio-serial channel in production, fakes in the workflow's unit tests."""

    def __init__(self, journal: Journal,
                 connect: Callable[[str], Hypervisor] = Hypervisor,
                 agent_for: AgentFactory = serial_agent) -> None:
        self.journal = journal
        self.connect = connect
        self.agent_for = agent_for

    # -- migration -------------------------------------------------------------------

    def migrate(self, request: MigrationRequest,
                on_event: Callable[[Event], None] = _ignore) -> MigrationReport:
        with self.connect(request.source_uri) as source, \
                self.connect(request.destination_uri) as destination:
            dom = source.domain(request.domain)
            workflow_id = self.journal.begin(
                "migrate", str(dom.UUIDString()), str(dom.name()), request.source_uri,
                request.destination_uri, asdict(request))
            try:
                report = MigrationWorkflow(request, self.journal, workflow_id, source,
                                           destination, on_event, self.agent_for).run()
            except PreflightError as exc:
                self.journal.finish(workflow_id, "refused", {"error": str(exc)})
                raise
            except Exception as exc:
                self.journal.finish(workflow_id, str(Outcome.FAILED), {"error": str(exc)})
                raise
            self.journal.finish(workflow_id, str(report.outcome), report.to_dict())
            return report

    # -- maintenance -----------------------------------------------------------------

    def failover(self, uri: str, domain: str, to: str) -> dict[str, str]:
        """Move every team to its standby or back to a primary, without migrating."""
        if to not in ("standby", "primary"):
            raise WorkflowError(f"--to must be standby or primary, not {to!r}")
        with self.connect(uri) as hv:
            guest = GuestOnHost(hv, domain, self.agent_for)
            workflow_id = self.journal.begin("failover", guest.uuid, guest.name, uri, uri,
                                             {"to": to})
            result: dict[str, str] = {}
            outcome = "failed"
            try:
                for team in guest.teams().teams:
                    op = f"{workflow_id}:{to}:{team.name}"
                    self.journal.record(workflow_id, f"{to}:{team.name}", "started", {})
                    if to == "standby":
                        guest.agent().use_standby(team.name, release_primary=False,
                                                  operation_id=op, timeout=SWITCH_TIMEOUT)
                        result[team.name] = "standby"
                    else:
                        result[team.name] = self._to_primary(guest, team, op)
                    self.journal.record(workflow_id, f"{to}:{team.name}", "done",
                                        {"result": result[team.name]})
                outcome = "done"
            finally:
                guest.close()
                self.journal.finish(workflow_id, outcome, {"teams": result})
            return result

    def _to_primary(self, guest: GuestOnHost, team: Team, operation_id: str) -> str:
        return to_primary(guest, team, operation_id, BIND_TIMEOUT, log.info)

    # -- queries -----------------------------------------------------------------------

    def status(self, uri: str, domain: str) -> dict[str, Any]:
        with self.connect(uri) as hv:
            guest = GuestOnHost(hv, domain, self.agent_for)
            try:
                out: dict[str, Any] = {"domain": guest.name, "uuid": guest.uuid, "teams": {}}
                agent_error = ""
                state = None
                try:
                    state = guest.agent().state()
                except Exception as exc:
                    agent_error = str(exc)
                states = {t.name: t for t in state.teams} if state is not None else {}
                for drift in guest.drift(state):  # the same classification as migrate's
                    team = drift.team
                    ts = states.get(team.name)
                    if state is None or (ts is None and not drift.degraded):
                        where = "unknown"
                    elif drift.case is TeamCase.PLUGGED:
                        where = "primary"
                    elif drift.case is TeamCase.ON_STANDBY:
                        where = "standby"
                    elif drift.case is TeamCase.UNRECORDED and ts is not None:
                        # plugged by hand: the bond may run on it; the drift line says so
                        bound = ts.active_member and ts.active_member == ts.primary
                        where = "primary" if bound else "standby"
                    else:
                        where = "degraded"
                    out["teams"][team.name] = {
                        "on": where, "pool": team.pool, "mac_policy": team.mac_policy,
                        "primary": asdict(team.primary) if team.primary else None,
                        "active_member": ts.active_member if ts else "",
                        "members": list(ts.members) if ts else [],
                        "case": str(drift.case),
                        "drift": drift.message if drift.drifted else "",
                    }
                if agent_error:
                    out["agent_error"] = agent_error
                return out
            finally:
                guest.close()

    def pools(self, uri: str) -> list[dict[str, Any]]:
        with self.connect(uri) as hv:
            domains = hv.all_domain_xml()
            out = []
            for name in sorted(hv.network_names()):
                if not name.startswith(POOL_PREFIX):
                    continue
                xml = hv.network_xml(name)
                if xml is None:
                    continue
                pool = parse_pool_network(xml)
                entry: dict[str, Any] = {"name": pool.name, "kind": type(pool).__name__}
                try:
                    entry["free"] = len(free_slots(pool, domains))
                except Exception as exc:
                    entry["free"] = None
                    entry["error"] = str(exc)
                out.append(entry)
            return out

    def workflows(self, limit: int = 20) -> list[dict[str, Any]]:
        return [{**w.to_dict(), "owner_alive": self.journal.is_owner_alive(w)}
                for w in self.journal.recent(limit)]

    # -- recovery ----------------------------------------------------------------------

    def recover(self) -> list[dict[str, Any]]:
        """Finish every open workflow whose coordinator died; leave live ones alone."""
        results = []
        for wf in self.journal.open_workflows():
            try:
                self.journal.adopt(wf.id)  # refuses while the owner still runs
            except JournalError:
                results.append({"workflow": wf.id, "domain": wf.domain_name,
                                "result": "still running"})
                continue
            try:
                outcome, detail = self._recover_one(wf.domain_uuid, wf.source_uri,
                                                    wf.destination_uri, wf.id)
            except Exception as exc:
                outcome, detail = str(Outcome.FAILED), str(exc)
            self.journal.finish(wf.id, outcome, {"recovered": True, "detail": detail})
            results.append({"workflow": wf.id, "domain": wf.domain_name, "result": outcome,
                            "detail": detail})
        return results

    def _recover_one(self, uuid: str, source_uri: str, destination_uri: str,
                     workflow_id: str) -> tuple[str, str]:
        hosts = [source_uri] if source_uri == destination_uri else [source_uri, destination_uri]
        self._wait_for_jobs(uuid, hosts)
        running = []
        for uri in hosts:
            try:
                with self.connect(uri) as hv:
                    if hv.has_domain(uuid) and hv.is_active(hv.domain(uuid)):
                        running.append(uri)
            except HypervisorError as exc:
                log.warning("recover: %s unreachable: %s", uri, exc)
        if len(running) != 1:
            return str(Outcome.FAILED), f"domain runs on {running or 'no host'}; check by hand"
        uri = running[0]
        teams = self._repair(uri, uuid, f"{workflow_id}:recover")
        where = "source" if uri == source_uri else "destination"
        if uri == source_uri and source_uri != destination_uri:
            outcome = Outcome.ROLLED_BACK
        elif all(v == "primary" for v in teams.values()):
            outcome = Outcome.DONE
        else:
            outcome = Outcome.DONE_DEGRADED
        return str(outcome), f"on the {where}; teams {teams}"

    def _wait_for_jobs(self, uuid: str, hosts: list[str],
                       timeout: float = RECOVER_JOB_WAIT) -> None:
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
                    while hv.is_active(dom) and hv.job_running(dom):
                        if time.monotonic() > deadline:
                            log.warning("recover: %s still has a job on %s", uuid, uri)
                            return
                        time.sleep(0.5)
            except HypervisorError as exc:
                log.warning("recover: %s: %s", uri, exc)

    def _repair(self, uri: str, ident: str, op_prefix: str) -> dict[str, str]:
        """Every team of the domain on *uri* back on a primary where a device is free."""
        with self.connect(uri) as hv:
            guest = GuestOnHost(hv, ident, self.agent_for)
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

    # -- reconciler ------------------------------------------------------------------

    def reconcile(self, uri: str, stopping: Callable[[], bool] = lambda: False,
                  ) -> list[dict[str, Any]]:
        """One pass over *uri*'s running domains with teams: repair the degraded ones.

        *stopping* is asked before each domain, so a shutdown waits for at most the one
        repair in progress and never leaves a journal entry open behind it.
        """
        repaired = []
        with self.connect(uri) as hv:
            candidates = []
            for xml in hv.all_domain_xml():
                try:
                    info = parse_domain(xml)
                except Exception:
                    continue
                if info.teams and info.teams.teams:
                    candidates.append(info.uuid)
        for uuid in candidates:
            if stopping():
                break
            with self.connect(uri) as hv:
                if not hv.is_active(hv.domain(uuid)):
                    continue
                guest = GuestOnHost(hv, uuid, self.agent_for)
                try:
                    # The same classification as migrate's preflight; a team ptmig cannot
                    # tell the device of is left to a person (the status says why).
                    drifts = guest.drift(guest.agent().state())
                    needs = [d.team.name for d in drifts
                             if d.case is not TeamCase.PLUGGED and not d.refused]
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
                workflow_id = self.journal.begin("repair", uuid, uuid, uri, uri,
                                                 {"teams": needs})
            except Exception as exc:  # another workflow owns the domain now
                log.info("reconcile: %s busy: %s", uuid, exc)
                continue
            try:
                teams = self._repair(uri, uuid, f"{workflow_id}:repair")
                self.journal.finish(workflow_id, "done", {"teams": teams})
                repaired.append({"domain": uuid, "teams": teams})
            except Exception as exc:
                self.journal.finish(workflow_id, str(Outcome.FAILED), {"error": str(exc)})
                repaired.append({"domain": uuid, "error": str(exc)})
        return repaired


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

    def run_once(self) -> list[dict[str, Any]]:
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
