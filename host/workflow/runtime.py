"""What every part of the coordinator shares: the journal, how to open a host and reach a
guest's agent, whom to tell, and how a workflow takes and gives back a domain's lease.

The parts (``runs``, ``cancel``, ``configuration``, ``queries``, ``recovery``,
``reconcile``, ``evacuation``) are handed one :class:`Runtime`; none of them knows the
:class:`~host.workflow.coordinator.Coordinator` that holds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from host.agent_client import AgentClient
from host.hypervisor import Domain, Hypervisor, HypervisorError
from host.workflow.guest import AgentFactory
from host.workflow.journal import Journal
from host.workflow.lease import SETTLE_S, DomainLease
from host.workflow.observer import Observer, notify

log = logging.getLogger(__name__)


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


def release_lease(lease: DomainLease, uuid: str, *hosts: Hypervisor) -> None:
    """Give the lease back on whichever of *hosts* holds the domain now."""
    for hv in hosts:
        try:
            if hv.has_domain(uuid):
                lease.release(hv.domain(uuid))
        except HypervisorError as exc:
            log.warning("lease: %s: %s", hv.uri, exc)
