"""A real agent gRPC server on a unix socket over the fake links, for tests and probes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from ptmig.v1 import guest_agent_pb2_grpc as pb_grpc

from guest_agent.config import ALL_RPCS
from guest_agent.links import Links
from guest_agent.operations import OperationLog
from guest_agent.server import build_server
from guest_agent.service import GuestAgentServicer
from guest_agent.teams import TeamConfig, Teams


@contextlib.contextmanager
def agent_server(
    socket_path: str,
    links: Links,
    teams: Sequence[TeamConfig],
    allowed: Sequence[str] = ALL_RPCS,
    max_message_bytes: int = 64 * 1024,
    default_timeout_s: float = 2.0,
    operations: OperationLog[Any] | None = None,
) -> Iterator[Any]:
    log = operations if operations is not None else OperationLog(64)
    servicer = GuestAgentServicer(Teams(links, teams), log, default_timeout_s)
    server = build_server(socket_path, servicer, max_message_bytes, frozenset(allowed))
    try:
        yield server
    finally:
        server.stop(None).wait()


@contextlib.contextmanager
def stubs(target: str, private: bool = False) -> Iterator[tuple[Any, Any]]:
    """GuestAgent and Health stubs; `private` keeps grpc from sharing the connection
    with other channels to the same target (its global subchannel pool)."""
    options = [("grpc.use_local_subchannel_pool", 1)] if private else []
    with grpc.insecure_channel(target, options=options) as channel:
        yield pb_grpc.GuestAgentStub(channel), pb_grpc.HealthStub(channel)
