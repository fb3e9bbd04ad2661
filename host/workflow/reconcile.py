"""Repair: every team of a domain back on a primary where a device is free, under the
domain's lease.  The reconciler's pass over a host's degraded domains and the
:class:`Reconciler` thread that runs it (``ptmigd --reconcile``); ``recover`` repairs
the same way."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from host.domain.domain_xml import parse_domain
from host.logfields import log_fields
from host.workflow.drift import TeamCase
from host.workflow.guest import BIND_TIMEOUT
from host.workflow.inventory import pool_uses
from host.workflow.journal import WorkflowKind
from host.workflow.lease import LeaseHeld
from host.workflow.model import Outcome, RepairResult, TeamMode
from host.workflow.observer import HostPass, notify
from host.workflow.runtime import Runtime

log = logging.getLogger(__name__)


def repair(
    rt: Runtime, uri: str, ident: str, op_prefix: str, workflow_id: str, kind: str
) -> dict[str, TeamMode]:
    """Every team of the domain on *uri* back on a primary where a device is free,
    under the domain's lease (:class:`LeaseHeld` if another workflow has it)."""
    with rt.connect(uri) as hv:
        guest = rt.guest(hv, ident)
        try:
            guest.take_lease(rt.lease(workflow_id, kind))
        except BaseException:
            guest.close()
            raise
        try:
            out: dict[str, TeamMode] = {}
            repair = []
            for found in guest.classify(guest.agent().state()):
                name = found.team.name
                if found.case is TeamCase.PLUGGED:
                    out[name] = TeamMode.PRIMARY
                elif found.refused:
                    log.warning("repair of %s: %s", guest.name, found.summary)
                    out[name] = TeamMode.STANDBY
                else:
                    repair.append(guest.correct_record(found))
            if repair:  # their devices plugged in one step, the binds together
                bound = guest.to_primaries(
                    repair, lambda name: f"{op_prefix}:{name}", BIND_TIMEOUT, log.info
                )
                out.update({name: got.result for name, got in bound.items()})
            return out
        finally:
            guest.close()
            guest.release_lease()


def reconcile(
    rt: Runtime,
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
    with rt.connect(uri) as hv:
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
        with rt.connect(uri) as hv:
            if not hv.domain(uuid).is_active():
                continue
            guest = rt.guest(hv, uuid)
            try:
                # The same classification as migrate's preflight; a team ptmig cannot
                # tell the device of is left to a person (the status says why).
                try:
                    state = guest.agent().state()
                except Exception:  # no answer, a bad one, or no channel to ask on
                    agents[guest.name] = False
                    raise
                agents[guest.name] = True
                classified = guest.classify(state)
                needs = [
                    d.team.name
                    for d in classified
                    if d.case is not TeamCase.PLUGGED and not d.refused
                ]
                degraded += sum(1 for d in classified if d.case is not TeamCase.PLUGGED)
                for d in classified:
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
            workflow_id = rt.journal.begin("repair", uuid, uuid, uri, uri, {"teams": needs})
        except Exception as exc:  # another workflow owns the domain now
            log.info("reconcile: %s busy: %s", uuid, exc)
            continue
        try:
            with log_fields(domain=uuid, workflow=workflow_id, phase="repair"):
                teams = repair(
                    rt, uri, uuid, f"{workflow_id}:repair", workflow_id, WorkflowKind.REPAIR
                )
            rt.journal.finish(workflow_id, Outcome.DONE, {"teams": teams})
            repaired.append(RepairResult(workflow_id, uuid, teams))
            degraded -= sum(1 for name in needs if teams.get(name) is TeamMode.PRIMARY)
            outcome = (
                "repaired"
                if teams and all(v is TeamMode.PRIMARY for v in teams.values())
                else "partly"
            )
            notify(rt.observer.repair_finished, uuid, outcome)
        except LeaseHeld as exc:  # another coordinator (another host's) is at it
            log.info("reconcile: %s busy: %s", uuid, exc)
            rt.journal.finish(workflow_id, Outcome.REFUSED, {"error": str(exc)})
        except Exception as exc:
            rt.journal.finish(workflow_id, Outcome.FAILED, {"error": str(exc)})
            repaired.append(RepairResult(workflow_id, uuid, error=str(exc)))
            notify(rt.observer.repair_finished, uuid, "failed")
    notify(rt.observer.degraded_teams, uri, degraded)
    notify(rt.observer.host_passed, uri, HostPass(agents, pools))
    return repaired


class Reconciles(Protocol):
    """What the :class:`Reconciler` runs: ``Coordinator.reconcile``."""

    def reconcile(self, uri: str, stopping: Callable[[], bool] = ...) -> list[RepairResult]: ...


class Reconciler:
    """Runs :meth:`Coordinator.reconcile` for some hosts, rate-limited, until stopped.

    Rate limit: a pass per host at most every *interval* seconds, and a host whose pass
    failed waits twice as long each time (up to 16 intervals), so a broken host does not
    keep the coordinator busy.
    """

    def __init__(
        self,
        coordinator: Reconciles,
        uris: list[str],
        interval: float = 10.0,
    ):
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
            for result in self.run_once():
                log.info("reconciler: %s", result)

    def start(self) -> None:
        """Run in a thread of its own until :meth:`stop`."""
        self._thread = threading.Thread(target=self.run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop, waiting for a repair in progress: killing it would leave its workflow open."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
