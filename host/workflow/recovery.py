"""``recover``: finish every open workflow whose coordinator died, from where the VM runs.

It does not replay the journal's steps: it waits for a migration job the dead coordinator
left running, then looks for the host the domain is active on (the live domain is the
truth) and repairs its teams there; a configuration change's one call cannot be checked,
so it is closed failed for a person to look at."""

from __future__ import annotations

import logging
import time

from host.hypervisor import HypervisorError
from host.workflow.configuration import CONFIGURATION_KINDS
from host.workflow.journal import JournalError
from host.workflow.model import STILL_RUNNING, Outcome, RecoverResult, TeamMode
from host.workflow.reconcile import repair
from host.workflow.runtime import Runtime

log = logging.getLogger(__name__)

#: How long ``recover`` waits for a migration a killed coordinator left running.
RECOVER_JOB_WAIT = 300.0


def recover(rt: Runtime) -> list[RecoverResult]:
    """Finish every open workflow whose coordinator died; leave live ones alone."""
    results = []
    for wf in rt.journal.open_workflows():
        try:
            rt.journal.adopt(wf.id)  # refuses while the owner still runs
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
                outcome, detail = _recover_one(
                    rt, wf.domain_uuid, wf.source_uri, wf.destination_uri, wf.id
                )
        except Exception as exc:
            outcome, detail, error = Outcome.FAILED, "", str(exc)
        rt.journal.finish(wf.id, str(outcome), {"recovered": True, "detail": detail or error})
        results.append(RecoverResult(wf.id, wf.domain_name, str(outcome), outcome, detail, error))
    return results


def _recover_one(
    rt: Runtime, uuid: str, source_uri: str, destination_uri: str, workflow_id: str
) -> tuple[Outcome, str]:
    hosts = [source_uri] if source_uri == destination_uri else [source_uri, destination_uri]
    _wait_for_jobs(rt, uuid, hosts)
    running = []
    for uri in hosts:
        try:
            with rt.connect(uri) as hv:
                if hv.has_domain(uuid) and hv.domain(uuid).is_active():
                    running.append(uri)
        except HypervisorError as exc:
            log.warning("recover: %s unreachable: %s", uri, exc)
    if len(running) != 1:
        return Outcome.FAILED, f"domain runs on {running or 'no host'}; check by hand"
    uri = running[0]
    teams = repair(rt, uri, uuid, f"{workflow_id}:recover", workflow_id, "recover")
    where = "source" if uri == source_uri else "destination"
    if uri == source_uri and source_uri != destination_uri:
        outcome = Outcome.ROLLED_BACK
    elif all(v is TeamMode.PRIMARY for v in teams.values()):
        outcome = Outcome.DONE
    else:
        outcome = Outcome.DONE_DEGRADED
    return outcome, f"on the {where}; teams { {name: str(mode) for name, mode in teams.items()} }"


def _wait_for_jobs(
    rt: Runtime, uuid: str, hosts: list[str], timeout: float = RECOVER_JOB_WAIT
) -> None:
    """Let a job the dead coordinator started end before looking where the VM runs.

    A peer-to-peer migration runs on inside the source's libvirtd after its client was
    killed; until it ends the VM is active on both hosts (paused on the destination).
    """
    deadline = time.monotonic() + timeout
    for uri in hosts:
        try:
            with rt.connect(uri) as hv:
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
