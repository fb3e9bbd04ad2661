"""Where ptmigd listens and who may call: the unix socket's checks, mutual TLS on TCP."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from ptmig.v1 import coordinator_pb2_grpc as pb_grpc

from host.daemon.servicer import Coordinator, CoordinatorServicer

log = logging.getLogger("ptmig.daemon")

DEFAULT_SOCKET = Path("/run/ptmig/ptmigd.sock")
RPC_THREADS = 16
STOP_GRACE_S = 5.0


class ConfigError(Exception):
    """ptmigd cannot start with this configuration; the message says why."""


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class ListenConfig:
    socket: Path = DEFAULT_SOCKET
    tcp: str | None = None  # HOST:PORT, only with tls
    tls: TlsFiles | None = None
    threads: int = RPC_THREADS

    def check(self) -> None:
        if self.tcp is not None and self.tls is None:
            raise ConfigError(
                f"refusing to listen on TCP {self.tcp} without mutual TLS: "
                "give --tls-cert, --tls-key and --tls-client-ca as well"
            )
        if self.tls is not None and self.tcp is None:
            raise ConfigError("TLS files are only used with --listen-tcp")
        if self.tcp is not None:
            host, sep, port = self.tcp.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"--listen-tcp {self.tcp!r} is not HOST:PORT")


@dataclass
class Daemon:
    """A started ptmigd server."""

    server: Any
    servicer: CoordinatorServicer
    socket: Path
    tcp_port: int | None = None

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop taking RPCs (running migrations go on; see :meth:`wait_for_workflows`)."""
        self.server.stop(grace).wait()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.socket).st_mode):
                os.unlink(self.socket)

    def wait_for_workflows(self, timeout: float | None = None) -> bool:
        return self.servicer.workers.join(timeout)


def check_socket_dir(directory: Path) -> None:
    """Create `directory` 0700 if missing; refuse it unless ours, a real dir and 0700."""
    if not os.path.lexists(directory):
        try:
            directory.mkdir(mode=0o700, parents=True)
            directory.chmod(0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create socket directory {directory}: {exc}") from exc
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"socket directory {directory} is not a directory (or is a symlink)")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"socket directory {directory} is owned by uid {info.st_uid}, not by ptmigd's "
            f"uid {os.geteuid()}; refusing to start"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o700:
        raise ConfigError(
            f"socket directory {directory} has mode {mode:04o}; it must be 0700 "
            "(only ptmigd's user may reach the socket); refusing to start"
        )


def prepare_socket(path: Path) -> None:
    check_socket_dir(path.parent)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # stale: nobody listens
        return
    finally:
        probe.close()
    raise ConfigError(f"another server is listening on {path}; is ptmigd already running?")


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def serve(coordinator: Coordinator, config: ListenConfig) -> Daemon:
    """Start ptmigd's gRPC server as `config` says; ConfigError when it must not or cannot."""
    config.check()
    credentials = None
    if config.tls is not None:
        credentials = grpc.ssl_server_credentials(
            [(_read(config.tls.key, "TLS key"), _read(config.tls.cert, "TLS certificate"))],
            root_certificates=_read(config.tls.client_ca, "TLS client CA"),
            require_client_auth=True,
        )
    prepare_socket(config.socket)
    servicer = CoordinatorServicer(coordinator)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="rpc"),
        options=[("grpc.so_reuseport", 0)],  # a second ptmigd on the same port fails
    )
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    tcp_port = None
    with _umask(0o177):
        _bind(lambda: server.add_insecure_port(f"unix:{config.socket}"), str(config.socket))
        if config.tcp is not None:
            tcp_port = _bind(lambda: server.add_secure_port(config.tcp, credentials), config.tcp)
        server.start()
    os.chmod(config.socket, 0o600)
    log.info(
        "ptmigd listening on unix:%s%s",
        config.socket,
        f" and tcp {config.tcp} (port {tcp_port}, mutual TLS)" if tcp_port else "",
    )
    return Daemon(server, servicer, config.socket, tcp_port)


def _bind(add: Callable[[], int], where: str) -> int:
    try:
        port = add()
    except RuntimeError as exc:  # grpcio >= 1.53 raises, older return 0
        raise ConfigError(f"cannot listen on {where}: {exc}") from exc
    if not port:
        raise ConfigError(f"cannot listen on {where}")
    return port
