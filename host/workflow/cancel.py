"""Cancel a domain's running migration, whichever process on this journal runs it.

Before the point of no return the cancel is recorded in the journal, where the workflow
looks for it between steps and during the libvirt job; after it, nothing is asked."""

from __future__ import annotations

import logging
import os
import socket
import time

from host.errors import Category
from host.workflow.errors import WorkflowError
from host.workflow.journal import Journal, WorkflowClosed, WorkflowKind, WorkflowRecord
from host.workflow.model import CancelResult, Outcome
from host.workflow.owners import boot_id_now

log = logging.getLogger(__name__)

#: How long ``cancel`` waits, by default, for the workflow to have rolled back.
CANCEL_WAIT = 300.0
#: Steps after which a migration cannot be cancelled: the VM has moved.
PAST_NO_RETURN = frozenset({"bind", "verify"})


class NothingToCancel(WorkflowError, LookupError):
    """The domain has no running migration to cancel; nothing was changed."""

    category = Category.NOT_FOUND


def cancel(
    journal: Journal, domain: str, *, requested_by: str = "", wait: float = CANCEL_WAIT
) -> CancelResult:
    """Stop *domain*'s running migration (``Coordinator.cancel``); this waits up to *wait*
    seconds for the workflow to end.  No running migration: :class:`NothingToCancel`."""
    record = _running_migration(journal, domain)
    steps = journal.steps(record.id)
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
        journal.request_cancel(record.id, who)
    except WorkflowClosed as exc:
        raise NothingToCancel(f"{record.domain_name}: {exc}; nothing to cancel") from None
    log.info("cancel of workflow %s (%s) asked by %s at %s", record.id, domain, who, phase)
    deadline = time.monotonic() + wait
    ended = journal.get(record.id)
    while ended is not None and ended.is_open and time.monotonic() < deadline:
        time.sleep(0.2)
        ended = journal.get(record.id)
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


def _running_migration(journal: Journal, domain: str) -> WorkflowRecord:
    if not domain:
        raise NothingToCancel("cancel: which domain?")
    mine = [w for w in journal.open_workflows() if domain in (w.domain_uuid, w.domain_name)]
    if not mine:
        raise NothingToCancel(
            f"{domain} has no running workflow in journal {journal.path}; "
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
    if here and not journal.is_owner_alive(record):
        raise NothingToCancel(
            f"{domain}'s workflow {record.id} is not running: its coordinator "
            f"(pid {record.owner_pid}) is gone; run 'ptmig recover' (nothing changed)"
        )
    return record


def _outcome(text: str | None) -> Outcome | None:
    """A migration's outcome as a cancel tells it: none for a refused one (it never
    started, and the contract's Outcome has no refused)."""
    try:
        outcome = Outcome(text) if text else None
    except ValueError:
        return None
    return None if outcome is Outcome.REFUSED else outcome
