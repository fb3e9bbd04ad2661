"""virtio-serial transport: sessions over a port that has no connections.

What the port does (shared/lab-notes/migration-corruption-and-virtio-serial.md,
part 2): a host reconnect within ~2 ms, or while the guest is not reading, shows
no EOF at all, so two sessions' bytes run together; bytes the host sent before
it disconnected stay readable afterwards; an EOF may even come *after* the next
session's first bytes; while no host is connected every read() returns EOF at
once, poll() reports POLLHUP without end, and writes fail EAGAIN; bytes in flight
at a disconnect or migration are lost.

So the host starts every connection with a HELLO frame (serial_session), and a
HELLO is the only thing that ends a session:
  * Before the first HELLO, host bytes are discarded.
  * On a HELLO: close the current gRPC connection, drop its unsent output, write
    ACK (same session id), open a fresh unix connection to the gRPC socket and
    relay raw bytes both ways.  The host discards everything before the ACK, so
    the old session's late bytes cannot reach the new one in either direction.
  * EOF only pauses reading: it may be stale (see above), and the host's next
    HELLO ends the session anyway.  The old gRPC connection idles until then.
  * The relay scans the relayed host bytes for a HELLO (a reconnect that showed
    no EOF); see serial_session.Scanner for why nothing is held back.

Limits: a HELLO lost in flight (migration) is never seen -- the host must time
out waiting for the ACK and reconnect with a new id; an ACK written just after
a migration can be lost the same way (the port's buffers do not migrate), with the
same cure.
Relayed bytes that happen to contain a valid 32-byte frame with a good CRC would
restart the session; the host controls those bytes.

While no host is connected the port is "ready" forever (POLLHUP, EOF), and no
event announces a connect, so after an EOF or EAGAIN the relay leaves the port
out of its poll for IDLE_PAUSE_S, as qemu-guest-agent does for its port.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable

from guest_agent.transports import serial_session as wire
from guest_agent.transports.pump import BUFFER_LIMIT, CHUNK, set_interest

log = logging.getLogger(__name__)

IDLE_PAUSE_S = 0.1  # latency added to a host's first HELLO; 10 wake-ups/s while idle
REOPEN_S = 2.0  # retry interval while the port device is missing
CONNECT_TIMEOUT_S = 2.0


class SerialRelay:
    def __init__(self, open_port: Callable[[], int], target: str, name: str = "virtio-serial"):
        self._open_port = open_port
        self._target = target
        self._name = name
        self._stopped = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()

    @classmethod
    def for_path(cls, path: str, target: str) -> SerialRelay:
        flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
        return cls(lambda: os.open(path, flags), target, f"virtio-serial {path}")

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):  # already stopped
            self._wake_w.send(b"x")

    def serve(self) -> None:
        missing_logged = False
        try:
            while not self._stopped.is_set():
                try:
                    fd = self._open_port()
                except OSError as exc:
                    if not missing_logged:
                        log.warning("%s: cannot open port (%s); retrying", self._name, exc)
                        missing_logged = True
                    self._stopped.wait(REOPEN_S)
                    continue
                missing_logged = False
                try:
                    stopped = _Session(fd, self._target, self._name, self._wake_r).run()
                finally:
                    os.close(fd)
                if not stopped:
                    self._stopped.wait(REOPEN_S)
        finally:
            self._wake_r.close()
            self._wake_w.close()


class _Session:
    """One open port: the hunting/relaying state machine."""

    def __init__(self, fd: int, target: str, name: str, wake: socket.socket) -> None:
        self.fd = fd
        self.target = target
        self.name = name
        self.wake = wake
        self.scanner = wire.Scanner(wire.FrameType.HELLO)
        self.conn: socket.socket | None = None
        self.session = ""
        self.to_port = bytearray()
        self.to_grpc = bytearray()
        self.paused_until = 0.0
        self.discarded = 0
        self.sel: selectors.BaseSelector | None = None

    def run(self) -> bool:
        """Relay until stop() (True) or a port error (False, logged)."""
        with selectors.DefaultSelector() as sel:
            self.sel = sel
            sel.register(self.wake, selectors.EVENT_READ)
            try:
                while True:
                    timeout = self._arm(sel)
                    for key, mask in sel.select(timeout):
                        if key.fileobj is self.wake:
                            return True
                        if key.fileobj is self.conn:
                            self._conn_ready(mask)
                        elif key.fileobj == self.fd:
                            self._port_ready(mask)
            except OSError as exc:
                log.error("%s: port failed: %s", self.name, exc)
                return False
            finally:
                self._end_session()

    def _arm(self, sel: selectors.BaseSelector) -> float | None:
        now = time.monotonic()
        port = 0
        if now >= self.paused_until:
            if len(self.to_grpc) < BUFFER_LIMIT:
                port |= selectors.EVENT_READ
            if self.to_port:
                port |= selectors.EVENT_WRITE
        set_interest(sel, self.fd, port)
        if self.conn is not None:
            events = selectors.EVENT_READ if len(self.to_port) < BUFFER_LIMIT else 0
            if self.to_grpc:
                events |= selectors.EVENT_WRITE
            set_interest(sel, self.conn, events)
        return None if now >= self.paused_until else self.paused_until - now

    def _pause(self) -> None:
        self.paused_until = time.monotonic() + IDLE_PAUSE_S

    # -- the port (host side) -------------------------------------------------

    def _port_ready(self, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = os.read(self.fd, CHUNK)
            except BlockingIOError:
                data = None
            if data:
                self._from_host(data)
            else:  # EOF (no host) or nothing after all: see the module docstring
                self._pause()
                return
        if mask & selectors.EVENT_WRITE and self.to_port:
            try:
                written = os.write(self.fd, self.to_port)
            except BlockingIOError:
                self._pause()  # POLLHUP reported as writable: no host connected
                return
            del self.to_port[:written]

    def _from_host(self, data: bytes) -> None:
        while data:
            before, frame, after = self.scanner.scan(data)
            if self.conn is not None:
                self.to_grpc += before
            else:
                self.discarded += len(before)
            if frame is None:
                return
            self._start_session(frame)
            data = after

    def _start_session(self, frame: wire.Frame) -> None:
        session = frame.session.hex()
        if self.conn is not None:
            log.info("%s: session %s replaced by %s", self.name, self.session, session)
        self._end_session()
        self.to_port.clear()  # the old session's unsent bytes must not precede the ACK
        if self.discarded:
            log.info("%s: discarded %d bytes before HELLO", self.name, self.discarded)
            self.discarded = 0
        if frame.version != wire.VERSION:
            log.warning("%s: HELLO version %d not supported", self.name, frame.version)
            self.to_port += wire.encode(wire.FrameType.REJECT, frame.session)
            return
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            conn.settimeout(CONNECT_TIMEOUT_S)
            conn.connect(self.target)
        except OSError as exc:
            log.error("%s: cannot reach %s: %s", self.name, self.target, exc)
            conn.close()
            self.to_port += wire.encode(wire.FrameType.REJECT, frame.session)
            return
        conn.setblocking(False)
        self.conn, self.session = conn, session
        self.to_port += wire.encode(wire.FrameType.ACK, frame.session)
        log.info("%s: session %s started", self.name, session)

    def _end_session(self) -> None:
        if self.conn is not None:
            if self.sel is not None and self.conn in self.sel.get_map():
                self.sel.unregister(self.conn)
            self.conn.close()
            self.conn = None
        self.to_grpc.clear()

    # -- the gRPC connection --------------------------------------------------

    def _conn_ready(self, mask: int) -> None:
        assert self.conn is not None
        try:
            if mask & selectors.EVENT_READ:
                data = self.conn.recv(CHUNK)
                if not data:
                    raise ConnectionAbortedError(errno.ECONNABORTED, "closed by the gRPC server")
                self.to_port += data
            if mask & selectors.EVENT_WRITE and self.to_grpc:
                sent = self.conn.send(self.to_grpc)
                del self.to_grpc[:sent]
        except BlockingIOError:
            pass  # spurious readiness
        except OSError as exc:
            log.info("%s: session %s ended: %s", self.name, self.session, exc)
            self._end_session()  # host bytes are discarded until its next HELLO
