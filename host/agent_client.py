"""The coordinator's channel to a guest's agent, and the limits it puts on what comes back.

The guest is untrusted: everything it sends is size-limited (gRPC message limits),
time-limited (a deadline on every call) and validated before the workflow sees it.  A broken
or hostile guest can fail its own migration; it cannot hang or crash the coordinator.

Transports (docs/agent-transport.md):

* virtio-serial: the channel's unix socket on the host is one byte stream with no session
  boundaries, so a small local relay sits in front of the gRPC channel and opens, for each
  HTTP/2 connection gRPC makes, a fresh chardev connection that starts with the HELLO/ACK
  handshake of :mod:`ptmig.serial_session`.
* vsock: plain gRPC to ``vsock:CID:PORT`` (needs grpcio >= 1.57 on the host).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue
import re
import secrets
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from ptmig import serial_session
from ptmig.v1 import guest_agent_pb2 as pb
from ptmig.v1 import guest_agent_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

#: Largest reply accepted from a guest.
MAX_REPLY_BYTES = 1 << 20
HANDSHAKE_TIMEOUT = 3.0
#: Most bytes a fresh channel connection may carry before our ACK.  What comes first is an
#: earlier session's output still in flight (virtqueue and socket buffers: well under
#: 1 MiB); more than this is a guest flooding the channel, and the handshake gives up at
#: once instead of reading and scanning it until its deadline.
MAX_HANDSHAKE_DISCARD = 4 << 20
#: Chunks a channel reader holds for its consumer (x 64 KiB): the bound on what a flooding
#: guest can make the coordinator buffer per session.
READER_BACKLOG = 16
_CHUNK = 65536
DEFAULT_CALL_TIMEOUT = 15.0
#: How long past a call's deadline the client waits for gRPC to end the call by itself
#: before it resets the channel's sessions (see :meth:`AgentClient._call`).
DEADLINE_GRACE = 0.5
#: Bounds on a guest's claims, well above any real guest.
MAX_LINKS = 512
MAX_TEAMS = 64
_IFNAME = re.compile(r"^[^\s/:]{1,15}$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_PCI = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


class AgentError(RuntimeError):
    """The agent answered with an error, broke the protocol, or did not answer in time.

    ``code`` is the gRPC status code name (``NOT_FOUND``, ``DEADLINE_EXCEEDED``, ...) or
    ``PROTOCOL`` for a reply that failed validation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _printable(text: str, limit: int = 300) -> str:
    """A guest-supplied string made safe to log and show."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


# -- virtio-serial relay ------------------------------------------------------------------


class ByteStream(Protocol):
    """A byte stream to a guest's virtio-serial channel: a libvirt stream or a unix socket."""

    def recv(self, size: int) -> bytes: ...

    def sendall(self, data: bytes) -> None: ...

    def close(self) -> None: ...


Connector = Callable[[], ByteStream]


class UnixStream:
    """The channel's socket file, for a coordinator on the guest's own host."""

    def __init__(self, path: str) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(HANDSHAKE_TIMEOUT)
        self._sock.connect(path)
        self._sock.settimeout(None)

    @classmethod
    def over(cls, sock: socket.socket) -> UnixStream:
        """The same stream over a socket already connected (one end of a socketpair)."""
        stream = cls.__new__(cls)
        stream._sock = sock
        return stream

    def recv(self, size: int) -> bytes:
        try:
            return self._sock.recv(size)
        except OSError:
            return b""

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a reader blocked in recv
        self._sock.close()


class _Reader:
    """Reads a stream in its own thread so that every wait on it can have a deadline.

    The backlog is bounded (:data:`READER_BACKLOG` chunks): when the consumer falls behind
    the thread stops reading, so a guest that floods the channel blocks on its own writes
    instead of filling the coordinator's memory.  :meth:`close` ends the thread even while
    it waits for room (it was an unbounded queue, fed as fast as the guest could write).
    """

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self._queue: queue.Queue[bytes] = queue.Queue(maxsize=READER_BACKLOG)
        self._closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="agent-channel-reader",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            data = self._stream.recv(_CHUNK)
            while True:
                try:
                    self._queue.put(data, timeout=0.1)
                    break
                except queue.Full:
                    if self._closed.is_set():
                        return
            if not data:
                return

    def read(self, timeout: float | None) -> bytes:
        """The next chunk, b"" at the end; raises TimeoutError."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None

    def close(self) -> None:
        """Stop reading and end the consumer's wait: what is queued is dropped for an end
        of stream.  The stream's own close wakes the thread if it is blocked in recv."""
        self._closed.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(b"")


#: Where a frame's session id starts (magic, version, type, reserved before it).
_SESSION_AT = serial_session.FRAME_SIZE - 4 - serial_session.SESSION_ID_SIZE


def handshake(stream: ByteStream, reader: _Reader, timeout: float = HANDSHAKE_TIMEOUT,
              max_discard: int = MAX_HANDSHAKE_DISCARD) -> bytes:
    """Start a session on a fresh channel connection; return the bytes that followed the ACK.

    Everything before our ACK is an earlier session's leftovers and is discarded, up to
    *max_discard* bytes.  The answer is found by our random session id (``bytes.find``),
    so the work per chunk is linear whatever the guest sends, and a frame carrying our id
    that is not a valid ACK or REJECT fails the attempt at once.  (It rescanned the whole
    buffer for each skipped frame: a chunk of other sessions' ACKs took seconds, and the
    deadline was only looked at between chunks; a flood was read until the deadline.)
    """
    session = secrets.token_bytes(serial_session.SESSION_ID_SIZE)
    stream.sendall(serial_session.encode(serial_session.FrameType.HELLO, session))
    deadline = time.monotonic() + timeout
    buf = b""
    received = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentError("UNAVAILABLE", f"no handshake answer from the guest in {timeout} s")
        try:
            chunk = reader.read(remaining)
        except TimeoutError:
            continue
        if not chunk:
            raise AgentError("UNAVAILABLE", "the guest's channel closed during the handshake")
        received += len(chunk)
        buf += chunk
        start = 0
        while (pos := buf.find(session, start)) >= 0:
            begin = pos - _SESSION_AT
            if begin < 0:  # not where a frame of ours could be
                start = pos + 1
                continue
            if len(buf) - begin < serial_session.FRAME_SIZE:
                break  # the rest of the frame is still to come
            frame = serial_session.decode(buf[begin:begin + serial_session.FRAME_SIZE])
            if frame is None or frame.type not in (serial_session.FrameType.ACK,
                                                   serial_session.FrameType.REJECT):
                raise AgentError("PROTOCOL", "the guest answered the handshake with a frame "
                                 "that is no valid ACK or REJECT")
            if frame.type == serial_session.FrameType.REJECT:
                raise AgentError("UNAVAILABLE", "the guest agent rejected the session")
            return buf[begin + serial_session.FRAME_SIZE:]
        if received > max_discard:
            raise AgentError("PROTOCOL", f"the guest sent {received} bytes and no handshake "
                             "answer (flooding the channel)")
        # keep only what could still hold the start of a frame
        buf = buf[-(serial_session.FRAME_SIZE - 1):]


class SerialRelay:
    """A local unix socket for gRPC that reaches the agent through a virtio-serial channel.

    Each connection gRPC makes gets a fresh channel connection and handshake, so each
    HTTP/2 connection is a session of its own (docs/agent-transport.md).

    :meth:`reset` ends every session at once, both ends (:class:`AgentClient` uses it on a
    call that outlived its deadline); :meth:`close` also stops the relay.  Neither leaves a
    session running: one still in its handshake gives up, and no channel connection is
    made after close (a session waiting for a silent guest went on for its retries, up to
    3 x HANDSHAKE_TIMEOUT, connecting to the guest again after the client was closed).
    """

    def __init__(self, connect: Connector, retries: int = 3) -> None:
        self.connect = connect
        self.retries = retries
        self._dir = tempfile.mkdtemp(prefix="ptmig-agent-")
        os.chmod(self._dir, 0o700)
        self.path = os.path.join(self._dir, "relay.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(4)
        self._closed = False
        self._lock = threading.Lock()
        #: What reset() ends: gRPC's connections, channel connections and their readers.
        self._clients: list[socket.socket] = []
        self._streams: list[tuple[ByteStream, _Reader]] = []
        self._thread = threading.Thread(target=self._accept, name="agent-relay", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"unix:{self.path}"

    def _track(self, stream: ByteStream, reader: _Reader) -> bool:
        """Register an open channel connection for reset(); False once closed."""
        with self._lock:
            if self._closed:
                return False
            self._streams.append((stream, reader))
            return True

    def _end(self, stream: ByteStream, reader: _Reader) -> None:
        reader.close()
        stream.close()
        with self._lock:
            if (stream, reader) in self._streams:
                self._streams.remove((stream, reader))

    def _open_session(self) -> tuple[ByteStream, _Reader, bytes]:
        last: Exception | None = None
        for attempt in range(1, self.retries + 1):
            if self._closed:
                raise AgentError("UNAVAILABLE", "the agent client was closed")
            t0 = time.monotonic()
            try:
                stream = self.connect()
            except (OSError, RuntimeError) as exc:
                last = exc
                log.info("agent channel: connect attempt %d failed: %s", attempt, exc)
                continue
            reader = _Reader(stream)
            if not self._track(stream, reader):
                self._end(stream, reader)
                raise AgentError("UNAVAILABLE", "the agent client was closed")
            try:
                rest = handshake(stream, reader)
                log.debug("agent channel: session %d up in %.3f s", attempt,
                          time.monotonic() - t0)
                return stream, reader, rest
            except (OSError, AgentError) as exc:
                last = exc
                log.info("agent channel: handshake attempt %d failed after %.1f s: %s",
                         attempt, time.monotonic() - t0, exc)
                self._end(stream, reader)
        raise AgentError("UNAVAILABLE", f"cannot reach the guest agent: {last}")

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._clients.append(client)
            threading.Thread(target=self._serve, args=(client,), name="agent-relay-session",
                             daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            self._relay(client)
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            client.close()

    def _relay(self, client: socket.socket) -> None:
        try:
            stream, reader, rest = self._open_session()
        except AgentError as exc:
            log.warning("%s", exc)
            return

        def upstream() -> None:
            """gRPC -> guest.  gRPC's end of its connection ends the whole session: the
            downstream half may be blocked writing to a gRPC that no longer reads."""
            try:
                while data := client.recv(65536):
                    stream.sendall(data)
            except OSError:
                pass
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            self._end(stream, reader)

        t = threading.Thread(target=upstream, name="agent-relay-up", daemon=True)
        t.start()
        try:
            if rest:
                client.sendall(rest)
            while data := reader.read(None):
                client.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)  # wakes upstream's recv
            self._end(stream, reader)  # wakes upstream's sendall

    def reset(self) -> None:
        """End every session now, in its handshake or relaying; gRPC reconnects on demand."""
        with self._lock:
            clients = list(self._clients)
            streams, self._streams = self._streams, []
        for client in clients:
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
        for stream, reader in streams:
            reader.close()
            stream.close()  # wakes the session's reader

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.reset()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)


# -- validation of replies ----------------------------------------------------------------


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise AgentError("PROTOCOL", f"invalid reply from the guest: {what}")


def _valid_name(name: str, *, empty_ok: bool = True) -> bool:
    """A Linux interface name: 1-15 printable characters, no blank, '/' or ':'.  Control
    characters would reach logs and terminals (escape sequences) unescaped."""
    return (empty_ok and name == "") or (name.isprintable() and bool(_IFNAME.fullmatch(name)))


def validate_team(team: pb.TeamState, name: str | None = None) -> None:
    """A team's state as the workflow may rely on it; *name*: the team that was asked about.

    The active member and the primary must be members of the bond: the workflow takes
    ``active_member == primary`` for "on its primary", and a team that says so about a
    link outside its bond is a lie, not a state.
    """
    _check(bool(team.name) and len(team.name) <= 64 and team.name.isprintable(), "team name")
    _check(name is None or team.name == name,
           f"asked about team {_printable(name or '')!r}, got {_printable(team.name)!r}")
    _check(_valid_name(team.bond, empty_ok=False), f"bond name {_printable(team.bond)!r}")
    _check(team.mac == "" or bool(_MAC.fullmatch(team.mac)), f"team MAC {_printable(team.mac)!r}")
    for member in (team.active_member, team.standby, team.primary, *team.members):
        _check(_valid_name(member), f"member name {_printable(member)!r}")
    _check(len(team.members) <= 8, "too many members")
    for role, member in (("active member", team.active_member), ("primary", team.primary)):
        _check(member == "" or member in team.members,
               f"team {_printable(team.name)}: {role} {member!r} is not in the bond")


def validate_state(state: pb.GetStateResponse) -> None:
    _check(len(state.links) <= MAX_LINKS, "too many links")
    _check(len(state.teams) <= MAX_TEAMS, "too many teams")
    for link in state.links:
        _check(_valid_name(link.name, empty_ok=False), f"link name {_printable(link.name)!r}")
        for mac in (link.mac, link.permanent_mac):
            _check(mac == "" or bool(_MAC.fullmatch(mac)), f"MAC {_printable(mac)!r}")
        _check(link.pci_address == "" or bool(_PCI.fullmatch(link.pci_address)),
               f"PCI address {_printable(link.pci_address)!r}")
    names = [t.name for t in state.teams]
    _check(len(names) == len(set(names)), "duplicate team names")
    for team in state.teams:
        validate_team(team)


# -- the client ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentEndpoint:
    """Where a guest's agent is reached: a virtio-serial channel or a vsock CID."""

    serial: Connector | None = None
    vsock_cid: int | None = None
    vsock_port: int = 7031


#: Where the ptmig processes of one host take turns at a guest's agent channel.
CHANNEL_TURN_DIR = "/run/ptmig/channels"
#: How long to wait for the turn: longer than any one step's agent calls.
CHANNEL_TURN_WAIT = 30.0


class ChannelTurn:
    """This process's turn at one guest's agent channel, among all ptmig processes here.

    The channel is opened with VIR_DOMAIN_CHANNEL_FORCE, which takes it from whoever holds
    it: a ``ptmig status`` would break a running migration's session (and once broke a
    libvirt client connection).  So a client holds an exclusive flock on a file named by
    the domain's UUID while it is open; the kernel drops it when the holder dies.
    """

    def __init__(self, domain_uuid: str, directory: str = CHANNEL_TURN_DIR,
                 wait: float = CHANNEL_TURN_WAIT) -> None:
        name = str(uuid.UUID(domain_uuid))  # a UUID, never a path of the caller's choice
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._fd: int | None = os.open(os.path.join(directory, name),
                                       os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    self.release()
                    raise AgentError("UNAVAILABLE", f"another ptmig process on this host has "
                                     f"been talking to the agent of {name} for over "
                                     f"{wait:.0f} s") from None
                time.sleep(0.1)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None


def new_operation_id() -> str:
    return str(uuid.uuid4())


class AgentClient:
    """Calls into one guest's agent, each with a deadline, each reply validated."""

    def __init__(self, endpoint: AgentEndpoint, call_timeout: float = DEFAULT_CALL_TIMEOUT,
                 turn: ChannelTurn | None = None):
        self.endpoint = endpoint
        self.call_timeout = call_timeout
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

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
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
                log.warning("agent call %s: no end %.1f s past its deadline; resetting the "
                            "channel", getattr(method, "_method", method), DEADLINE_GRACE)
                self._relay.reset()

        watchdog = threading.Timer(wait + DEADLINE_GRACE, expire)
        watchdog.name = "agent-call-watchdog"
        watchdog.daemon = True
        watchdog.start()
        try:
            return method(request, timeout=wait, wait_for_ready=True)
        except grpc.RpcError as exc:
            if fired.is_set():
                raise AgentError("DEADLINE_EXCEEDED", f"no answer from the guest in {wait} s "
                                 "(its channel was stuck and was reset)") from None
            code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            raise AgentError(code, _printable(details or "")) from None
        finally:
            watchdog.cancel()

    def version(self, timeout: float | None = None) -> pb.GetVersionResponse:
        reply: pb.GetVersionResponse = self._call(
            self._stub.GetVersion, pb.GetVersionRequest(operation_id=new_operation_id()), timeout)
        _check(len(reply.capabilities) <= 64, "too many capabilities")
        return reply

    def healthy(self, timeout: float | None = None) -> bool:
        reply = self._call(self._health.Check, pb.HealthCheckRequest(), timeout)
        return bool(reply.status == pb.HealthCheckResponse.SERVING)

    def state(self, timeout: float | None = None) -> pb.GetStateResponse:
        reply: pb.GetStateResponse = self._call(
            self._stub.GetState, pb.GetStateRequest(operation_id=new_operation_id()), timeout)
        validate_state(reply)
        return reply

    def use_standby(self, team: str, *, release_primary: bool, operation_id: str,
                    timeout: float | None = None) -> pb.UseStandbyResponse:
        wait = timeout or self.call_timeout
        reply: pb.UseStandbyResponse = self._call(self._stub.UseStandby, pb.UseStandbyRequest(
            operation_id=operation_id, team=team, release_primary=release_primary,
            timeout_ms=int(wait * 1000 * 0.9)), wait)
        validate_team(reply.team, team)
        return reply

    def bind_primary(self, team: str, *, operation_id: str, pci_address: str = "",
                     mac: str = "", mac_policy: int = 0,
                     timeout: float | None = None) -> pb.BindPrimaryResponse:
        wait = timeout or self.call_timeout
        reply: pb.BindPrimaryResponse = self._call(self._stub.BindPrimary, pb.BindPrimaryRequest(
            operation_id=operation_id, team=team, pci_address=pci_address, mac=mac,
            mac_policy=mac_policy, timeout_ms=int(wait * 1000 * 0.9)), wait)
        validate_team(reply.team, team)
        _check(_valid_name(reply.device, empty_ok=False), "bound device name")
        return reply


@contextlib.contextmanager
def connect(endpoint: AgentEndpoint, call_timeout: float = DEFAULT_CALL_TIMEOUT
            ) -> Iterator[AgentClient]:
    client = AgentClient(endpoint, call_timeout)
    try:
        yield client
    finally:
        client.close()
