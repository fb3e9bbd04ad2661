"""The coordinator's channel to a guest's agent, and the limits it puts on what comes back.

The guest is untrusted: everything it sends is size-limited (gRPC message limits),
time-limited (a deadline on every call) and validated before the workflow sees it, as the
dataclasses of :mod:`host.agent_client.state` (the protobuf types stay in this package).
A broken or hostile guest can fail its own migration; it cannot hang or crash the
coordinator.

Transports (docs/agent-transport.md):

* virtio-serial: the channel's unix socket on the host is one byte stream with no session
  boundaries, so a small local relay sits in front of the gRPC channel and opens, for each
  HTTP/2 connection gRPC makes, a fresh chardev connection that starts with the HELLO/ACK
  handshake of :mod:`ptmig.serial_session`.
* vsock: plain gRPC to ``vsock:CID:PORT`` (needs grpcio >= 1.57 on the host).
"""

from host.agent_client.client import DEADLINE_GRACE, AgentClient, AgentEndpoint, new_operation_id
from host.agent_client.errors import AgentError
from host.agent_client.reach import AgentFactory, AgentOnDemand, Channelled, serial_agent
from host.agent_client.relay import ByteStream, ChannelReader, SerialRelay
from host.agent_client.replies import MAX_LINKS, MAX_TEAMS, validate_state, validate_team
from host.agent_client.state import (
    AgentVersion,
    BindReply,
    GuestState,
    LinkState,
    StandbyReply,
    TeamEvent,
    TeamState,
)
from host.agent_client.turns import ChannelTurn

__all__ = [
    "DEADLINE_GRACE",
    "MAX_LINKS",
    "MAX_TEAMS",
    "AgentClient",
    "AgentEndpoint",
    "AgentError",
    "AgentFactory",
    "AgentOnDemand",
    "AgentVersion",
    "BindReply",
    "ByteStream",
    "ChannelReader",
    "ChannelTurn",
    "Channelled",
    "GuestState",
    "LinkState",
    "SerialRelay",
    "StandbyReply",
    "TeamEvent",
    "TeamState",
    "new_operation_id",
    "serial_agent",
    "validate_state",
    "validate_team",
]
