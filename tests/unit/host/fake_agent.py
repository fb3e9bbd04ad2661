"""The fake agent: the real AgentClient with its gRPC stubs answered by the world's
:class:`fake_guest.FakeGuest` (see workflow_fakes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from fake_libvirt import DomainRecord
from ptmig.v1 import guest_agent_pb2 as pb

from host.agent_client import AgentClient, AgentEndpoint, AgentError

if TYPE_CHECKING:
    from workflow_fakes import World


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self._code = getattr(grpc.StatusCode, code, grpc.StatusCode.UNKNOWN)
        self._details = details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class _Stubs:
    """GuestAgentStub and HealthStub of one guest, reached through one host."""

    def __init__(self, world: World, uri: str, uuid: str) -> None:
        self.world, self.uri, self.uuid = world, uri, uuid

    def _rpc(
        self,
        rpc: str,
        subject: str,
        handle: Callable[[DomainRecord], Any],
        timeout: float | None = None,
    ) -> Any:
        try:
            host = self.world.hosts.get(self.uri)
            domain = host.domains.get(self.uuid) if host is not None else None
            hook = self.world.agent_before.get((domain.name if domain else "", rpc))
            if hook is not None:
                hook(subject, timeout)
            with self.world.op("agent", rpc, subject):
                host = self.world.hosts.get(self.uri)
                record = host.domains.get(self.uuid) if host is not None else None
                if record is None or not record.active:
                    raise AgentError("UNAVAILABLE", "the guest's channel closed")
                if not record.guest.agent_up:
                    raise AgentError(
                        "UNAVAILABLE",
                        "cannot reach the guest agent: no handshake answer from the guest in 3.0 s",
                    )
                reply = handle(record)
                tamper = self.world.tamper.get(rpc)
                if tamper is not None:
                    tamper(reply)
                return reply
        except AgentError as exc:
            raise FakeRpcError(exc.code, exc.message) from None

    def GetVersion(
        self, request: pb.GetVersionRequest, timeout: float | None = None, **_: Any
    ) -> pb.GetVersionResponse:
        return self._rpc(
            "GetVersion",
            "",
            lambda r: pb.GetVersionResponse(
                agent_version="0.1.0",
                api_version=1,
                capabilities=["use-standby", "bind-primary", "mac-policy:preserve"],
            ),
            timeout,
        )

    def Check(
        self, request: pb.HealthCheckRequest, timeout: float | None = None, **_: Any
    ) -> pb.HealthCheckResponse:
        return self._rpc(
            "Check",
            "",
            lambda r: pb.HealthCheckResponse(
                status=pb.HealthCheckResponse.SERVING
                if r.guest.serving
                else pb.HealthCheckResponse.NOT_SERVING
            ),
            timeout,
        )

    def GetState(
        self, request: pb.GetStateRequest, timeout: float | None = None, **_: Any
    ) -> pb.GetStateResponse:
        return self._rpc("GetState", "", lambda r: r.guest.state(r.live), timeout)

    def UseStandby(
        self, request: pb.UseStandbyRequest, timeout: float | None = None, **_: Any
    ) -> pb.UseStandbyResponse:
        return self._rpc(
            "UseStandby", request.team, lambda r: r.guest.use_standby(r.live, request), timeout
        )

    def BindPrimary(
        self, request: pb.BindPrimaryRequest, timeout: float | None = None, **_: Any
    ) -> pb.BindPrimaryResponse:
        return self._rpc(
            "BindPrimary", request.team, lambda r: r.guest.bind_primary(r.live, request), timeout
        )


class _Channel:
    def __init__(self, world: World) -> None:
        self.world = world
        self.closed = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.world.agents_open -= 1


class FakeAgent(AgentClient):
    """The real AgentClient (its validation, its error mapping) over in-memory stubs."""

    def __init__(self, world: World, uri: str, uuid: str, timeout: float) -> None:
        # Not AgentClient.__init__: it would open a gRPC channel.  These are what its
        # methods use.
        self.endpoint = AgentEndpoint(vsock_cid=3)
        self.call_timeout = timeout
        self.on_call = None
        self._relay = None
        self._turn = None
        self._channel = _Channel(world)  # type: ignore[assignment]
        self._stub = self._health = _Stubs(world, uri, uuid)  # type: ignore[assignment]
        world.agents_open += 1
