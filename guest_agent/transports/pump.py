"""Copy bytes both ways between two connected stream sockets until both ends close.

Half-close is passed on (EOF from one side becomes shutdown(SHUT_WR) on the
other); a reset or error on either side ends both.  One thread per pair: the
agent has a handful of connections at most.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket

log = logging.getLogger(__name__)

CHUNK = 64 * 1024
BUFFER_LIMIT = 1024 * 1024  # stop reading a side while the other lags this much


class Pump:
    def __init__(self, a: socket.socket, b: socket.socket, name: str) -> None:
        self._socks = (a, b)
        self._name = name
        self._wake_r, self._wake_w = socket.socketpair()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(self) -> None:
        a, b = self._socks
        for sock in (a, b, self._wake_r):
            sock.setblocking(False)
        pending = {a: bytearray(), b: bytearray()}  # bytes waiting to be written to the key
        reading = {a: True, b: True}
        shut: set[socket.socket] = set()
        peer = {a: b, b: a}
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self._wake_r, selectors.EVENT_READ)
                while reading[a] or reading[b] or pending[a] or pending[b]:
                    for sock in (a, b):
                        events = 0
                        if reading[sock] and len(pending[peer[sock]]) < BUFFER_LIMIT:
                            events |= selectors.EVENT_READ
                        if pending[sock]:
                            events |= selectors.EVENT_WRITE
                        set_interest(sel, sock, events)
                    for key, mask in sel.select():
                        if key.fileobj is self._wake_r:
                            return
                        sock = key.fileobj  # type: ignore[assignment]
                        with contextlib.suppress(BlockingIOError):  # spurious readiness
                            if mask & selectors.EVENT_READ:
                                data = sock.recv(CHUNK)
                                if data:
                                    pending[peer[sock]] += data
                                else:
                                    reading[sock] = False
                            if mask & selectors.EVENT_WRITE and pending[sock]:
                                sent = sock.send(pending[sock])
                                del pending[sock][:sent]
                    for sock in (a, b):
                        if not reading[sock] and not pending[peer[sock]] and peer[sock] not in shut:
                            _shutdown_write(peer[sock])
                            shut.add(peer[sock])
        except OSError as exc:
            log.info("%s: connection ended: %s", self._name, exc)
        finally:
            for sock in (a, b, self._wake_r, self._wake_w):
                sock.close()


def set_interest(sel: selectors.BaseSelector, fileobj: int | socket.socket, events: int) -> None:
    """Watch *fileobj* for exactly *events* (none: not at all), whatever it had before."""
    key = sel.get_map().get(fileobj)
    if key is None:
        if events:
            sel.register(fileobj, events)
    elif not events:
        sel.unregister(fileobj)
    elif key.events != events:
        sel.modify(fileobj, events)


def _shutdown_write(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
