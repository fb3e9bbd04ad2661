"""One workflow per domain across hosts: the lease in the domain's metadata.

The journal's unique index keeps one open workflow per domain *per journal*; the lease
(host/domain/lease.py) extends that to every coordinator that can reach the domain,
whatever journal it keeps: before acting, a workflow takes the lease; between steps it
renews it (and stops if it is someone else's); at the end it releases it.  A workflow
does each through the :class:`~host.workflow.guest.Guest` it holds (``take_lease``,
``renew_lease``, ``release_lease``), which passes its own Domain here.

libvirt has no compare-and-swap for metadata, so taking is Fischer's timed mutual
exclusion: read; if free, write ours; wait :data:`SETTLE_S`; read again and go on only
if ours is still there.  Two coordinators that both saw it free both write, and the
later write wins for both readers, provided each write landed within half the wait of
its read (checked; a slower one backs off and tries again).

Free means: no lease, an expired one, or one whose holder process is gone on this very
machine (a killed coordinator's, for ``ptmig recover``; or the machine rebooted since).
A holder on another machine cannot be asked, so only expiry frees its lease:
:data:`LEASE_TTL` after its last renewal, :data:`JOB_LEASE_TTL` from the start of the
migration job (libvirt allows no metadata change during a job, so it cannot be renewed
then, nor taken by anyone: a domain with a job running is refused at once).  Hosts'
clocks are assumed to agree within seconds (NTP).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from host.domain.errors import DomainModelError
from host.domain.lease import LEASE_NS, LEASE_PREFIX, Lease, format_lease, lease_from_domain_xml
from host.errors import Category
from host.hypervisor import Domain, HypervisorError
from host.workflow.errors import WorkflowError
from host.workflow.owners import boot_id_now, process_alive, process_start_time

log = logging.getLogger(__name__)

LEASE_TTL = 300.0  # between steps; every step is shorter (its calls have deadlines)
JOB_LEASE_TTL = 3600.0  # across the migration job, which cannot renew it
SETTLE_S = 0.5  # Fischer's wait: longer than a metadata write may take, halved
TAKE_ATTEMPTS = 3


class LeaseHeld(WorkflowError):
    """Another coordinator's workflow holds the domain; nothing was changed."""

    category = Category.BUSY
    hint = "wait for it, or see 'ptmig workflows' on its host"


class LeaseLost(WorkflowError):
    """The lease this workflow took is now someone else's: it must stop acting."""

    category = Category.ABORTED


@dataclass(frozen=True)
class Holder:
    """This process, as a lease names it."""

    name: str
    machine: str
    boot: str
    pid: int
    start: int | None

    @classmethod
    def this_process(cls) -> Holder:
        try:
            machine = Path("/etc/machine-id").read_text().strip()
        except OSError:
            machine = ""
        pid = os.getpid()
        return cls(socket.gethostname(), machine, boot_id_now() or "", pid, process_start_time(pid))


def is_free(lease: Lease, me: Holder, now: float) -> bool:
    """Whether *lease* may be taken by *me* at *now* (see the module's docstring)."""
    if now > lease.expires:
        return True
    if lease.machine and lease.machine == me.machine:
        if lease.boot != me.boot:
            return True  # this machine rebooted since: its holder is gone
        return not process_alive(lease.pid, lease.start, lease.boot or None)
    return False


class DomainLease:
    """The lease of one workflow on a domain, as this process takes, renews and releases
    it, on whichever host the domain runs."""

    def __init__(
        self,
        workflow_id: str,
        kind: str,
        *,
        settle: float = SETTLE_S,
        me: Holder | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.workflow_id = workflow_id
        self.kind = kind
        self.settle = settle
        self.me = me or Holder.this_process()
        self.clock = clock
        self.sleep = sleep

    def _mine(self, ttl: float) -> Lease:
        return Lease(
            workflow=self.workflow_id,
            kind=self.kind,
            holder=self.me.name,
            machine=self.me.machine,
            boot=self.me.boot,
            pid=self.me.pid,
            start=self.me.start,
            expires=self.clock() + ttl,
        )

    def is_mine(self, lease: Lease | None) -> bool:
        return (
            lease is not None
            and lease.workflow == self.workflow_id
            and (lease.machine, lease.boot, lease.pid)
            == (self.me.machine, self.me.boot, self.me.pid)
        )

    @staticmethod
    def read(dom: Domain) -> Lease | None:
        try:
            return lease_from_domain_xml(dom.xml())
        except DomainModelError as exc:
            raise LeaseHeld(
                f"{dom.name}: its lease cannot be read ({exc}); fix it by hand"
            ) from None

    def _write(self, dom: Domain, ttl: float) -> None:
        dom.set_metadata(LEASE_NS, LEASE_PREFIX, format_lease(self._mine(ttl)))

    def take(self, dom: Domain, ttl: float = LEASE_TTL) -> None:
        """Take the lease or raise :class:`LeaseHeld` naming its holder."""
        if dom.is_active() and dom.job_running():
            # libvirt would hold the metadata write until its job lock times out (30 s)
            raise LeaseHeld(
                f"domain {dom.name} has a libvirt job running (a migration?); nothing changed"
            )
        for attempt in range(TAKE_ATTEMPTS):
            t0 = time.monotonic()
            current = self.read(dom)
            if current is not None and not self.is_mine(current):
                if not is_free(current, self.me, self.clock()):
                    raise LeaseHeld(_held_message(dom, current))
                log.info("taking over the stale lease of %s", current.describe())
            self._write(dom, ttl)
            slow = self.settle > 0 and time.monotonic() - t0 > self.settle / 2
            self.sleep(self.settle)
            back = self.read(dom)
            if not self.is_mine(back):
                raise LeaseHeld(_held_message(dom, back) if back else f"{dom.name}: lease lost")
            if not slow:
                return
            # Too slow to be sure nobody read "free" before our write and wrote after the
            # wait: give ours back and try again.
            log.info("lease write took over %.2f s; again (attempt %d)", self.settle / 2, attempt)
            dom.set_metadata(LEASE_NS, LEASE_PREFIX, None)
            self.sleep(self.settle * (attempt + 1))
        raise LeaseHeld(f"{dom.name}: libvirt was too slow to take the lease safely; try again")

    def renew(self, dom: Domain, ttl: float = LEASE_TTL) -> None:
        """Extend ours; raise :class:`LeaseLost` if another workflow's is there.  A lease
        that vanished (another coordinator's slow take gave its own back) is taken again."""
        current = self.read(dom)
        if current is None:
            try:
                self.take(dom, ttl)
            except LeaseHeld as exc:
                raise LeaseLost(str(exc)) from exc
            return
        if not self.is_mine(current):
            raise LeaseLost(f"{dom.name}: the lease is now held by {current.describe()}")
        self._write(dom, ttl)

    def release(self, dom: Domain) -> bool:
        """Remove ours (never another's); whether none of ours is left.  A failure only
        leaves it to expire."""
        try:
            if self.is_mine(self.read(dom)):
                dom.set_metadata(LEASE_NS, LEASE_PREFIX, None)
            return True
        except (HypervisorError, WorkflowError) as exc:
            log.warning("lease of %s not released (it expires by itself): %s", dom.name, exc)
            return False


def _held_message(dom: Domain, lease: Lease) -> str:
    until = time.strftime("%H:%M:%S", time.localtime(lease.expires))
    return (
        f"domain {dom.name} is held by {lease.describe()} (lease until {until}); "
        "nothing was changed: cancel or wait for that workflow"
    )
