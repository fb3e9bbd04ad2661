"""How the coordinator reaches one guest's agent: over its virtio-serial channel through
libvirt (any host, no paths), opened when first needed."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol

from ptmig.serial_session import AGENT_CHANNEL

from host.agent_client.client import AgentClient, AgentEndpoint
from host.agent_client.relay import ByteStream
from host.agent_client.turns import ChannelTurn


class Channelled(Protocol):
    """A domain whose channels can be opened (host.hypervisor.Domain)."""

    @property
    def uuid(self) -> str: ...

    def open_channel(self, name: str) -> ByteStream: ...


#: How a workflow reaches a guest's agent; tests put a fake here.
AgentFactory = Callable[[Channelled, float], AgentClient]


def serial_agent(dom: Channelled, timeout: float) -> AgentClient:
    """The agent over its virtio-serial channel, once no other ptmig process on this host
    is using that channel (:class:`ChannelTurn`)."""
    turn = ChannelTurn(dom.uuid)
    endpoint = AgentEndpoint(serial=lambda: dom.open_channel(AGENT_CHANNEL))
    try:
        return AgentClient(endpoint, call_timeout=timeout, turn=turn)
    except BaseException:
        turn.release()
        raise


class AgentOnDemand:
    """One guest's agent client, opened by the first call that needs it, closed by
    :meth:`close` (and opened again if asked after).

    Opening takes this host's turn at the guest's channel, which a running migration
    holds: a ``team-show`` or a configuration change, which never asks the agent, must
    not wait for it.
    """

    def __init__(self, open_client: Callable[[], AgentClient]) -> None:
        self._open = open_client
        self._client: AgentClient | None = None
        self._lock = threading.Lock()  # teams are worked on in parallel

    def client(self) -> AgentClient:
        with self._lock:
            if self._client is None:
                self._client = self._open()
            return self._client

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
