"""The gRPC face: GuestAgent and Health servicers over Teams, and the allow-list.

Every failure leaves as a gRPC status with a precise code and a one-line
message, never as a traceback; unexpected exceptions are logged here with their
traceback and answered INTERNAL.  Every state-changing call is logged with its
operation id, arguments, outcome and duration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import grpc
from ptmig.v1 import guest_agent_pb2 as pb
from ptmig.v1 import guest_agent_pb2_grpc as pb_grpc

from guest_agent import __version__
from guest_agent.links import FailOverMac, Link, by_index
from guest_agent.operations import OperationIdReused, OperationLog
from guest_agent.rules import ManagedBy
from guest_agent.teams import Abandoned, MacPolicy, Ownership, TeamError, Teams, TeamState

log = logging.getLogger(__name__)

T = TypeVar("T")

API_VERSION = 1
DEADLINE_MARGIN_S = 0.2  # answer our own DEADLINE_EXCEEDED before the caller's fires
STATE_READ_MARGIN_S = 1.0  # a link dump under TCG takes a few hundred ms

_POLICY_TO_PB = {
    MacPolicy.PRESERVE: pb.MAC_POLICY_PRESERVE,
    MacPolicy.FOLLOW: pb.MAC_POLICY_FOLLOW,
    MacPolicy.NONE: pb.MAC_POLICY_NONE,
}
_POLICY_FROM_PB = {value: key for key, value in _POLICY_TO_PB.items()}
_OWNERSHIP_TO_PB = {Ownership.ADMIN: pb.OWNERSHIP_ADMIN, Ownership.AGENT: pb.OWNERSHIP_AGENT}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def link_to_pb(link: Link, links: list[Link]) -> Any:
    master = by_index(links, link.master)
    return pb.Link(
        name=link.name,
        index=link.index,
        mac=link.mac or "",
        permanent_mac=link.permanent_mac or "",
        carrier=link.carrier,
        operstate=link.operstate,
        admin_up=link.admin_up,
        master=master.name if master else "",
        kind=link.kind or "",
        pci_address=link.pci_address or "",
    )


def team_to_pb(team: TeamState) -> Any:
    """A coordinator-driven team's message is what it was before guest-managed teams
    existed: their fields are left unset, which proto3 does not serialise."""
    fail_over_mac = team.fail_over_mac
    event = team.last_event
    return pb.TeamState(
        name=team.name,
        bond=team.bond,
        bond_present=team.bond_present,
        mac_policy=_POLICY_TO_PB[team.mac_policy],
        ownership=_OWNERSHIP_TO_PB[team.ownership],
        mac=team.mac or "",
        fail_over_mac=FailOverMac(fail_over_mac).name.lower() if fail_over_mac is not None else "",
        active_member=team.active_member or "",
        standby=team.standby or "",
        members=list(team.members),
        primary=team.primary or "",
        managed_by_guest=team.managed_by is ManagedBy.GUEST,
        last_event=pb.TeamEvent(
            kind=event.kind,
            device=event.device,
            reason=event.reason,
            ok=event.ok,
            detail=event.detail,
            unix_ms=event.unix_ms,
        )
        if event
        else None,
    )


#: What the operation log keeps of a state-changing call's response: its type and bytes.
Recorded = tuple[Any, bytes]


class GuestAgentServicer(pb_grpc.GuestAgentServicer):  # type: ignore[misc]
    def __init__(
        self,
        teams: Teams,
        operations: OperationLog[Recorded],
        default_timeout_s: float,
        capabilities: Iterable[str] = (),
    ) -> None:
        self._teams = teams
        self._operations = operations
        self._default_timeout_s = default_timeout_s
        self._capabilities = [
            "get-state",
            "use-standby",
            "bind-primary",
            "operation-id-replay",
            *(f"mac-policy:{policy.value}" for policy in MacPolicy),
            *capabilities,
        ]

    # -- read-only -----------------------------------------------------------

    def GetVersion(self, request: Any, context: grpc.ServicerContext) -> Any:
        return pb.GetVersionResponse(
            agent_version=__version__, api_version=API_VERSION, capabilities=self._capabilities
        )

    def GetState(self, request: Any, context: grpc.ServicerContext) -> Any:
        def state() -> Any:
            links, teams = self._teams.snapshot(self._state_deadline(context))
            return pb.GetStateResponse(
                links=[link_to_pb(link, links) for link in links],
                teams=[team_to_pb(team) for team in teams],
            )

        return _answer(context, "GetState", request, state, changes=False)

    # -- state-changing ------------------------------------------------------

    def UseStandby(self, request: Any, context: grpc.ServicerContext) -> Any:
        def switch() -> Any:
            result = self._teams.use_standby(
                request.team,
                request.release_primary,
                self._deadline(request, context),
                context.is_active,
            )
            return pb.UseStandbyResponse(team=team_to_pb(result.team), released=result.released)

        return self._once(context, "UseStandby", request, switch)

    def BindPrimary(self, request: Any, context: grpc.ServicerContext) -> Any:
        policy = request.mac_policy
        if policy != pb.MAC_POLICY_UNSPECIFIED and policy not in _POLICY_FROM_PB:
            return _answer(context, "BindPrimary", request, _bad(f"unknown mac_policy {policy}"))

        def bind() -> Any:
            result = self._teams.bind_primary(
                request.team,
                request.pci_address or None,
                request.mac or None,
                _POLICY_FROM_PB.get(policy),
                self._deadline(request, context),
                context.is_active,
            )
            return pb.BindPrimaryResponse(team=team_to_pb(result.team), device=result.device)

        return self._once(context, "BindPrimary", request, bind)

    def _once(
        self, context: grpc.ServicerContext, method: str, request: Any, action: Callable[[], Any]
    ) -> Any:
        """Run `action` at most once per operation id; replay its recorded outcome.

        The log keeps a response as its message type and wire bytes, not as the message:
        a message of Debian 12's protobuf is C++ memory, malloc'd in the RPC thread's
        glibc arena right after the call's netlink work, and 256 of them (the log's
        size) kept that arena's freed pages resident: +8 MB over a full log natively, and
        in the lab guest +9.5 MB against +3.4 MB with bytes over 70 migrations' calls
        (docs/benchmarks/agent.md, issue 24).  Bytes are Python's (small ones from its
        own allocator) and cost a parse per answer, microseconds.
        """
        if not request.operation_id:
            return _answer(context, method, request, _bad("operation_id is required"))
        key = request.__class__()
        key.CopyFrom(request)
        key.operation_id = ""
        fingerprint = (method, key.SerializeToString(deterministic=True))

        def record() -> Recorded:
            response = action()
            return type(response), response.SerializeToString()

        def once() -> Any:
            (kind, data), replayed = self._operations.run(
                request.operation_id, fingerprint, record, not_done=(Abandoned,)
            )
            response = kind.FromString(data)
            if replayed:
                response.replayed = True
            return response

        return _answer(context, method, request, once, changes=True)

    def _state_deadline(self, context: grpc.ServicerContext) -> float:
        """How long GetState may wait for busy teams: the agent's default wait, less the
        time to read and answer before the caller's deadline."""
        wait = self._default_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            wait = min(wait, max(0.0, remaining - STATE_READ_MARGIN_S))
        return time.monotonic() + wait

    def _deadline(self, request: Any, context: grpc.ServicerContext) -> float:
        timeout = request.timeout_ms / 1000 if request.timeout_ms else self._default_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            timeout = min(timeout, max(0.0, remaining - DEADLINE_MARGIN_S))
        return time.monotonic() + timeout


def _bad(message: str) -> Callable[[], Any]:
    def fail() -> Any:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    return fail


def _answer(
    context: grpc.ServicerContext,
    method: str,
    request: Any,
    action: Callable[[], T],
    changes: bool = True,
) -> T:
    """Run `action`; turn every failure into a status; log what changed or failed."""
    started = time.monotonic()
    args = _summary(request)
    try:
        response = action()
    except _Abort as exc:
        error = exc
    except TeamError as exc:
        error = _Abort(getattr(grpc.StatusCode, exc.code), str(exc))
    except OperationIdReused as exc:
        error = _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except Exception as exc:
        log.exception("%s %s: unexpected failure", method, args)
        error = _Abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    else:
        if changes:
            took = (time.monotonic() - started) * 1000
            replayed = " (replayed)" if getattr(response, "replayed", False) else ""
            log.info("%s %s -> OK%s in %.0f ms", method, args, replayed, took)
        return response
    took = (time.monotonic() - started) * 1000
    level = logging.WARNING if changes else logging.INFO
    log.log(level, "%s %s -> %s: %s (%.0f ms)", method, args, error.code.name, error.message, took)
    context.abort(error.code, error.message)
    raise AssertionError("context.abort returned")  # pragma: no cover


def _summary(request: Any) -> str:
    fields = [f"{fd.name}={value!r}" for fd, value in request.ListFields()]
    return "(" + ", ".join(fields) + ")"


class HealthServicer(pb_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 semantics: "" or a served service name -> SERVING, else NOT_FOUND."""

    SERVICES = ("", "ptmig.v1.GuestAgent")

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:
        if request.service not in self.SERVICES:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return pb.HealthCheckResponse(status=pb.HealthCheckResponse.SERVING)


class AllowList(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuse RPCs not named in the config's allowed_rpcs with PERMISSION_DENIED."""

    def __init__(self, allowed: Iterable[str]) -> None:
        self._allowed = {f"/ptmig.v1.{name}" for name in allowed}

    def intercept_service(
        self, continuation: Callable[[Any], Any], handler_call_details: Any
    ) -> Any:
        method = handler_call_details.method
        if method in self._allowed:
            return continuation(handler_call_details)
        log.warning("refused %s: not in allowed_rpcs", method)

        def deny(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{method} is not allowed here")

        return grpc.unary_unary_rpc_method_handler(deny)


def add_to_server(
    server: grpc.Server, agent: GuestAgentServicer, health: HealthServicer | None = None
) -> None:
    pb_grpc.add_GuestAgentServicer_to_server(agent, server)
    pb_grpc.add_HealthServicer_to_server(health or HealthServicer(), server)
