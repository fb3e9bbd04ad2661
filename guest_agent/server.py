"""Assemble the agent: gRPC server on a root-only unix socket, then the transports.

The gRPC server listens on nothing but the unix socket: the host reaches it only
through the transports' relays, which the agent controls.  The socket's
directory is 0700 and the socket 0600 (with umask 077 around the bind, so it is
never briefly wider).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

from guest_agent import __version__, config
from guest_agent.autonomy import Watcher
from guest_agent.links import Links
from guest_agent.operations import OperationLog
from guest_agent.rules import ManagedBy
from guest_agent.service import AllowList, GuestAgentServicer, add_to_server
from guest_agent.teams import TeamEvent, Teams, deadline_in
from guest_agent.transports.virtio_serial import SerialRelay
from guest_agent.transports.vsock import StreamRelay

log = logging.getLogger(__name__)

RPC_THREADS = 4
STOP_GRACE_S = 2.0


class SocketError(RuntimeError):
    """The agent's socket path is unusable (wrong owner, not a socket, bind failed)."""


def prepare_socket_dir(path: str) -> None:
    """Create the socket's directory 0700 and remove a stale socket, nothing else."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise SocketError(f"{directory} is not a directory owned by uid {os.geteuid()}")
    os.chmod(directory, 0o700)
    try:
        existing = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(existing.st_mode):
        raise SocketError(f"{path} exists and is not a socket; not removing it")
    os.unlink(path)


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def build_server(
    socket_path: str,
    agent: GuestAgentServicer,
    max_message_bytes: int,
    allowed_rpcs: frozenset[str] | set[str],
) -> Any:
    """A started gRPC server on `socket_path` (mode 0600) and nowhere else."""
    prepare_socket_dir(socket_path)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=RPC_THREADS, thread_name_prefix="rpc"),
        interceptors=[AllowList(allowed_rpcs)],
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
    )
    add_to_server(server, agent)
    with _umask(0o177):
        try:
            bound = server.add_insecure_port(f"unix:{socket_path}")
        except RuntimeError as exc:  # grpcio >= 1.53 raises, older return 0
            raise SocketError(f"cannot listen on {socket_path}: {exc}") from exc
        if not bound:
            raise SocketError(f"cannot listen on {socket_path}")
        server.start()
    os.chmod(socket_path, 0o600)
    return server


class Agent:
    """The running pieces, for an orderly stop (a plain class: see guest_agent.links)."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.relays: list[SerialRelay | StreamRelay] = []
        self.threads: list[threading.Thread] = []
        self.watcher: Watcher | None = None

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        for relay in self.relays:
            relay.stop()
        for thread in self.threads:
            thread.join(timeout=STOP_GRACE_S)
        self.server.stop(STOP_GRACE_S).wait()


def start(
    cfg: config.AgentConfig,
    links: Links,
    warm_up: Callable[[], None] | None = None,
    on_event: Callable[[str, TeamEvent], None] | None = None,
) -> Agent:
    """Start the gRPC server and the transports; set up agent-owned teams.

    *warm_up* runs in a thread of its own once the socket listens: what the first call
    would otherwise pay (netlink's import and first dump) is paid while the agent
    already answers.  *on_event*: each event the watcher records (tests wait on it).
    """
    teams = Teams(links, cfg.teams)
    capabilities = []
    if cfg.virtio_serial.enabled:
        capabilities.append("transport:virtio-serial")
    if cfg.vsock.enabled:
        capabilities.append("transport:vsock")
    guest_managed = [team.name for team in cfg.teams if team.managed_by is ManagedBy.GUEST]
    if guest_managed:
        capabilities.append("managed-by:guest")
    agent = GuestAgentServicer(
        teams,
        OperationLog(cfg.operation_log_size),
        cfg.default_timeout_ms / 1000,
        capabilities,
    )
    server = build_server(cfg.socket, agent, cfg.max_message_bytes, cfg.allowed_rpcs)
    log.info("ptmig-agent %s listening on %s", __version__, cfg.socket)
    running = Agent(server)
    if warm_up is not None:
        threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    if cfg.virtio_serial.enabled:
        _run(running, SerialRelay.for_path(cfg.virtio_serial.port, cfg.socket), "virtio-serial")
    if cfg.vsock.enabled:
        _run(running, StreamRelay.for_port(cfg.vsock.port, cfg.socket), "vsock")
    # After the transports: the host may already ask GetState while bonds are made.
    teams.set_up_owned(deadline_in(cfg.default_timeout_ms / 1000))
    if guest_managed:  # after the bonds exist; with none, no watcher runs at all
        log.info("guest-managed teams: %s", ", ".join(guest_managed))
        running.watcher = Watcher(teams, links, cfg.default_timeout_ms / 1000, on_event=on_event)
        running.watcher.start()
    return running


def _run(agent: Agent, relay: SerialRelay | StreamRelay, name: str) -> None:
    thread = threading.Thread(target=relay.serve, name=name, daemon=True)
    thread.start()
    agent.relays.append(relay)
    agent.threads.append(thread)


def run_until_signalled(agent: Agent) -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(3600):
        pass
    log.info("stopping")
    started = time.monotonic()
    agent.stop()
    log.info("stopped in %.1f s", time.monotonic() - started)
