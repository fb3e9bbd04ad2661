"""What every part of the coordinator shares: the journal, how to open a host and reach a
guest's agent, whom to tell; and the :class:`~host.workflow.guest.Guest` built from them,
with its domain and its agent, for a workflow to hold.

The parts (``runs``, ``cancel``, ``configuration``, ``queries``, ``recovery``,
``reconcile``, ``evacuation``) are handed one :class:`Runtime`; none of them knows the
:class:`~host.workflow.coordinator.Coordinator` that holds it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from host.agent_client import AgentClient, AgentFactory, AgentOnDemand
from host.hypervisor import Domain, Hypervisor, HypervisorError
from host.workflow.guest import AGENT_TIMEOUT, Guest
from host.workflow.journal import Journal
from host.workflow.lease import SETTLE_S, DomainLease
from host.workflow.observer import Observer, notify

log = logging.getLogger(__name__)

#: How long a workflow's end keeps trying to reach a host whose connection it lost, to
#: give the domain's lease back there: longer than a libvirtd restart.
RECONNECT_S = 30.0
RECONNECT_POLL_S = 1.0


@dataclass
class Runtime:
    """*connect* opens a host by URI and *make_agent* reaches a guest's agent: libvirt and
    the virtio-serial channel in production, fakes in the workflow's unit tests."""

    journal: Journal
    connect: Callable[[str], Hypervisor]
    make_agent: AgentFactory
    observer: Observer
    #: Fischer's wait when taking a domain's lease (host/workflow/lease.py); the fakes'
    #: unit tests set 0.
    lease_settle: float = SETTLE_S

    def agent_for(self, dom: Domain, timeout: float) -> AgentClient:
        """The workflow's agent client, its calls told to the observer."""
        client = self.make_agent(dom, timeout)
        client.on_call = lambda rpc, seconds, error: notify(
            self.observer.agent_call, rpc, seconds, error
        )
        return client

    def lease(self, workflow_id: str, kind: str) -> DomainLease:
        return DomainLease(workflow_id, kind, settle=self.lease_settle)

    def guest(self, hv: Hypervisor, ident: str, lease: DomainLease | None = None) -> Guest:
        """The domain *ident* on *hv*'s host, its agent opened when first asked."""
        dom = hv.domain(ident)
        return Guest(hv, dom, AgentOnDemand(lambda: self.agent_for(dom, AGENT_TIMEOUT)), lease)

    def release_lease_where_lost(self, lease: DomainLease, uuid: str, *hosts: Hypervisor) -> None:
        """Give the lease back on each of *hosts* whose connection the workflow lost (its
        libvirtd restarted, or it dropped the client after the VM moved), over a new one,
        trying for up to :data:`RECONNECT_S`: the workflow could not release it there,
        and a coordinator that lives on (ptmigd) would block the reconciler's repair of
        the domain until the lease expired."""
        for hv in hosts:
            if not hv.is_alive():
                self._release_over_a_new_connection(lease, uuid, hv.uri)

    def _release_over_a_new_connection(self, lease: DomainLease, uuid: str, uri: str) -> None:
        deadline = time.monotonic() + RECONNECT_S
        while True:
            try:
                with self.connect(uri) as again:
                    if not again.has_domain(uuid) or lease.release(again.domain(uuid)):
                        return
            except HypervisorError as exc:
                log.info("lease: %s: %s", uri, exc)
            if time.monotonic() > deadline:
                log.warning("lease of %s on %s not released (it expires by itself)", uuid, uri)
                return
            time.sleep(RECONNECT_POLL_S)
