"""Calls into one guest's agent: a deadline each, a watchdog past it, replies validated."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from ptmig.v1 import guest_agent_pb2 as pb
from ptmig.v1 import guest_agent_pb2_grpc as pb_grpc

from host.agent_client.errors import AgentError, printable
from host.agent_client.relay import Connector, SerialRelay
from host.agent_client.replies import check, valid_name, validate_state, validate_team
from host.agent_client.state import (
    MAC_POLICY_TO_PB,
    AgentVersion,
    BindReply,
    GuestState,
    StandbyReply,
    TeamState,
)
from host.agent_client.turns import ChannelTurn
from host.domain.kinds import MacPolicy

log = logging.getLogger(__name__)

#: Largest reply accepted from a guest.
MAX_REPLY_BYTES = 1 << 20
DEFAULT_CALL_TIMEOUT = 15.0
#: How long past a call's deadline the client waits for gRPC to end the call by itself
#: before it resets the channel's sessions (see :meth:`AgentClient._call`).
DEADLINE_GRACE = 0.5


@dataclass(frozen=True)
class AgentEndpoint:
    """Where a guest's agent is reached: a virtio-serial channel or a vsock CID."""

    serial: Connector | None = None
    vsock_cid: int | None = None
    vsock_port: int = 7031


def new_operation_id() -> str:
    return str(uuid.uuid4())


class AgentClient:
    """Calls into one guest's agent, each with a deadline, each reply validated and
    returned as the types of :mod:`host.agent_client.state`."""

    def __init__(
        self,
        endpoint: AgentEndpoint,
        call_timeout: float = DEFAULT_CALL_TIMEOUT,
        turn: ChannelTurn | None = None,
    ):
        self.endpoint = endpoint
        self.call_timeout = call_timeout
        #: Told of every call: (RPC name, seconds, gRPC code name or "" when it worked).
        self.on_call: Callable[[str, float, str], None] | None = None
        self._turn = turn  # released on close
        self._relay: SerialRelay | None = None
        options = [
            ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
            ("grpc.max_send_message_length", MAX_REPLY_BYTES),
            ("grpc.enable_retries", 0),
        ]
        if endpoint.serial is not None:
            self._relay = SerialRelay(endpoint.serial)
            target = self._relay.target
        elif endpoint.vsock_cid is not None:
            target = f"vsock:{endpoint.vsock_cid}:{endpoint.vsock_port}"
        else:
            raise ValueError("an agent endpoint needs a serial socket or a vsock CID")
        self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.GuestAgentStub(self._channel)
        self._health = pb_grpc.HealthStub(self._channel)

    def close(self) -> None:
        self._channel.close()
        if self._relay is not None:
            self._relay.close()
        if self._turn is not None:
            self._turn.release()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, rpc: str, method: Any, request: Any, timeout: float | None) -> Any:
        """One call with its deadline, also when gRPC itself misses it.

        A guest that floods the connection with HTTP/2 frames gRPC must answer (PING,
        SETTINGS) and never reads the answers wedges gRPC's transport: measured with
        grpcio 1.85, a call with a 1 s deadline then hung for good in most runs.  A
        watchdog resets the relay's sessions :data:`DEADLINE_GRACE` after the deadline;
        gRPC sees its connection end and fails the call, reported as DEADLINE_EXCEEDED.
        """
        wait = timeout or self.call_timeout
        fired = threading.Event()

        def expire() -> None:
            fired.set()
            if self._relay is not None:
                log.warning(
                    "agent call %s: no end %.1f s past its deadline; resetting the channel",
                    getattr(method, "_method", method),
                    DEADLINE_GRACE,
                )
                self._relay.reset()

        watchdog = threading.Timer(wait + DEADLINE_GRACE, expire)
        watchdog.name = "agent-call-watchdog"
        watchdog.daemon = True
        started = time.monotonic()
        error = "UNKNOWN"
        watchdog.start()
        try:
            reply = method(request, timeout=wait, wait_for_ready=True)
            error = ""
            return reply
        except grpc.RpcError as exc:
            if fired.is_set():
                error = "DEADLINE_EXCEEDED"
                raise AgentError(
                    error,
                    f"no answer from the guest in {wait} s (its channel was stuck and was reset)",
                ) from None
            error = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise AgentError(error, printable(details or "")) from None
        finally:
            watchdog.cancel()
            if self.on_call is not None:
                self.on_call(rpc, time.monotonic() - started, error)

    def version(self, timeout: float | None = None) -> AgentVersion:
        reply: pb.GetVersionResponse = self._call(
            "GuestAgent/GetVersion",
            self._stub.GetVersion,
            pb.GetVersionRequest(operation_id=new_operation_id()),
            timeout,
        )
        check(len(reply.capabilities) <= 64, "too many capabilities")
        return AgentVersion(reply.agent_version, reply.api_version, tuple(reply.capabilities))

    def healthy(self, timeout: float | None = None) -> bool:
        reply = self._call("Health/Check", self._health.Check, pb.HealthCheckRequest(), timeout)
        return bool(reply.status == pb.HealthCheckResponse.SERVING)

    def state(self, timeout: float | None = None) -> GuestState:
        reply: pb.GetStateResponse = self._call(
            "GuestAgent/GetState",
            self._stub.GetState,
            pb.GetStateRequest(operation_id=new_operation_id()),
            timeout,
        )
        validate_state(reply)
        return GuestState.from_pb(reply)

    def use_standby(
        self, team: str, *, release_primary: bool, operation_id: str, timeout: float | None = None
    ) -> StandbyReply:
        wait = timeout or self.call_timeout
        reply: pb.UseStandbyResponse = self._call(
            "GuestAgent/UseStandby",
            self._stub.UseStandby,
            pb.UseStandbyRequest(
                operation_id=operation_id,
                team=team,
                release_primary=release_primary,
                timeout_ms=int(wait * 1000 * 0.9),
            ),
            wait,
        )
        validate_team(reply.team, team)
        return StandbyReply(TeamState.from_pb(reply.team), tuple(reply.released), reply.replayed)

    def bind_primary(
        self,
        team: str,
        *,
        operation_id: str,
        pci_address: str = "",
        mac: str = "",
        mac_policy: MacPolicy | None = None,
        timeout: float | None = None,
    ) -> BindReply:
        wait = timeout or self.call_timeout
        reply: pb.BindPrimaryResponse = self._call(
            "GuestAgent/BindPrimary",
            self._stub.BindPrimary,
            pb.BindPrimaryRequest(
                operation_id=operation_id,
                team=team,
                pci_address=pci_address,
                mac=mac,
                mac_policy=MAC_POLICY_TO_PB[mac_policy],
                timeout_ms=int(wait * 1000 * 0.9),
            ),
            wait,
        )
        validate_team(reply.team, team)
        check(valid_name(reply.device, empty_ok=False), "bound device name")
        return BindReply(TeamState.from_pb(reply.team), reply.device, reply.replayed)
