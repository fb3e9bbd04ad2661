"""The virtio-serial relay: a local socket for gRPC, a fresh channel session per
connection, each opened with the HELLO/ACK handshake (docs/agent-transport.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Protocol

from ptmig import serial_session

from host.agent_client.errors import AgentError

log = logging.getLogger(__name__)

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


# -- virtio-serial relay ------------------------------------------------------------------


class ByteStream(Protocol):
    """A byte stream to a guest's virtio-serial channel: a libvirt stream or a unix socket."""

    def recv(self, size: int) -> bytes: ...

    def sendall(self, data: bytes) -> None: ...

    def close(self) -> None: ...


Connector = Callable[[], ByteStream]


class ChannelReader:
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
        self.thread = threading.Thread(target=self._run, name="agent-channel-reader", daemon=True)
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


def handshake(
    stream: ByteStream,
    reader: ChannelReader,
    timeout: float = HANDSHAKE_TIMEOUT,
    max_discard: int = MAX_HANDSHAKE_DISCARD,
) -> bytes:
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
            frame = serial_session.decode(buf[begin : begin + serial_session.FRAME_SIZE])
            if frame is None or frame.type not in (
                serial_session.FrameType.ACK,
                serial_session.FrameType.REJECT,
            ):
                raise AgentError(
                    "PROTOCOL",
                    "the guest answered the handshake with a frame that is no valid ACK or REJECT",
                )
            if frame.type == serial_session.FrameType.REJECT:
                raise AgentError("UNAVAILABLE", "the guest agent rejected the session")
            return buf[begin + serial_session.FRAME_SIZE :]
        if received > max_discard:
            raise AgentError(
                "PROTOCOL",
                f"the guest sent {received} bytes and no handshake answer (flooding the channel)",
            )
        # keep only what could still hold the start of a frame
        buf = buf[-(serial_session.FRAME_SIZE - 1) :]


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
        self._streams: list[tuple[ByteStream, ChannelReader]] = []
        self._thread = threading.Thread(target=self._accept, name="agent-relay", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"unix:{self.path}"

    def _track(self, stream: ByteStream, reader: ChannelReader) -> bool:
        """Register an open channel connection for reset(); False once closed."""
        with self._lock:
            if self._closed:
                return False
            self._streams.append((stream, reader))
            return True

    def _end(self, stream: ByteStream, reader: ChannelReader) -> None:
        reader.close()
        stream.close()
        with self._lock:
            if (stream, reader) in self._streams:
                self._streams.remove((stream, reader))

    def _open_session(self) -> tuple[ByteStream, ChannelReader, bytes]:
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
            reader = ChannelReader(stream)
            if not self._track(stream, reader):
                self._end(stream, reader)
                raise AgentError("UNAVAILABLE", "the agent client was closed")
            try:
                rest = handshake(stream, reader)
                log.debug("agent channel: session %d up in %.3f s", attempt, time.monotonic() - t0)
                return stream, reader, rest
            except (OSError, AgentError) as exc:
                last = exc
                log.info(
                    "agent channel: handshake attempt %d failed after %.1f s: %s",
                    attempt,
                    time.monotonic() - t0,
                    exc,
                )
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
            threading.Thread(
                target=self._serve, args=(client,), name="agent-relay-session", daemon=True
            ).start()

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
