"""vsock transport: one fresh unix connection to the gRPC socket per vsock connection.

A migration resets the established vsock connections (the host end is gone); the
listening socket survives it, and the host simply connects again.  The accept
loop is written against any listening stream socket, so tests drive it over
AF_UNIX where the machine has no vsock loopback.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
from collections.abc import Callable

from guest_agent.transports.pump import Pump

log = logging.getLogger(__name__)

VMADDR_CID_ANY = 0xFFFFFFFF
REOPEN_S = 2.0  # retry interval while the guest has no vsock device (yet)
_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN, errno.ECONNRESET}


def open_listener(port: int, cid: int = VMADDR_CID_ANY) -> socket.socket:
    """A listening AF_VSOCK socket; OSError if the guest has no vsock device."""
    sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind((cid, port))
        sock.listen(8)
    except OSError:
        sock.close()
        raise
    return sock


class StreamRelay:
    """Accepts on the socket `open_listener` gives; relays each connection to `target`.

    `open_listener` is retried every REOPEN_S while it fails: the vsock device can
    appear after the agent starts (hot-plug, module load).
    """

    def __init__(
        self, open_listener: Callable[[], socket.socket], target: str, name: str = "vsock"
    ) -> None:
        self._open_listener = open_listener
        self._target = target
        self._name = name
        self._stopped = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._pumps: set[Pump] = set()
        self._lock = threading.Lock()

    @classmethod
    def for_port(cls, port: int, target: str) -> StreamRelay:
        return cls(lambda: open_listener(port), target, f"vsock port {port}")

    def stop(self) -> None:
        self._stopped.set()
        with contextlib.suppress(OSError):  # already stopped
            self._wake_w.send(b"x")

    def serve(self) -> None:
        try:
            listener = self._listen()
            if listener is None:
                return
            listener.setblocking(False)
            with listener, selectors.DefaultSelector() as sel:
                sel.register(listener, selectors.EVENT_READ)
                sel.register(self._wake_r, selectors.EVENT_READ)
                while True:
                    ready = {key.fileobj for key, _ in sel.select()}
                    if self._wake_r in ready:
                        return
                    self._accept(listener)
        finally:
            with self._lock:
                for pump in self._pumps:
                    pump.stop()
            self._wake_r.close()
            self._wake_w.close()

    def _listen(self) -> socket.socket | None:
        logged = False
        while not self._stopped.is_set():
            try:
                return self._open_listener()
            except OSError as exc:
                if not logged:
                    log.warning("%s: cannot listen (%s); retrying", self._name, exc)
                    logged = True
                self._stopped.wait(REOPEN_S)
        return None

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, peer = listener.accept()
        except OSError as exc:
            if exc.errno not in _TRANSIENT:
                log.warning("%s: accept failed: %s", self._name, exc)
            return
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            upstream.connect(self._target)
        except OSError as exc:
            log.warning("%s: cannot reach %s: %s", self._name, self._target, exc)
            upstream.close()
            conn.close()
            return
        log.info("%s: connection from %s", self._name, peer)
        pump = Pump(conn, upstream, f"{self._name} {peer}")
        with self._lock:
            self._pumps.add(pump)
        threading.Thread(
            target=self._run, args=(pump,), name=f"{self._name}-pump", daemon=True
        ).start()

    def _run(self, pump: Pump) -> None:
        try:
            pump.run()
        finally:
            with self._lock:
                self._pumps.discard(pump)
