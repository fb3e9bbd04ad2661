"""The host's half of the virtio-serial handshake, as a test helper.

Written from docs/agent-transport.md, using only the wire-format module the host
is meant to copy.  `HostConnector` is what a host needs in front of a gRPC
channel: a local unix socket whose every accepted connection becomes one session
(HELLO, wait for ACK discarding the port's old bytes, then raw bytes).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time

from guest_agent.transports import serial_session as wire


class Rejected(Exception):
    pass


def handshake(port: socket.socket, timeout: float = 3.0) -> bytes:
    """Send HELLO, read until our ACK; return the bytes that followed it."""
    session = os.urandom(wire.SESSION_ID_SIZE)
    port.sendall(wire.encode(wire.FrameType.HELLO, session))
    deadline = time.monotonic() + timeout
    buf = b""
    while True:
        for frame_type in (wire.FrameType.ACK, wire.FrameType.REJECT):
            start = 0
            while (found := wire.find(buf[start:], frame_type)) is not None:
                pos, frame = found
                end = start + pos + wire.FRAME_SIZE
                if frame.session == session:
                    if frame_type == wire.FrameType.REJECT:
                        raise Rejected(session.hex())
                    return buf[end:]
                start = end  # an ACK for an older session: keep looking
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no ACK")
        ready, _, _ = select.select([port], [], [], remaining)
        if ready:
            data = port.recv(65536)
            if not data:
                raise ConnectionError("port closed")
            buf += data


class HostConnector:
    """Local unix socket -> sessions over one (emulated) virtio-serial port."""

    def __init__(self, path: str, port: socket.socket) -> None:
        self.path = path
        self.port = port
        self.sessions = 0
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with client:
                leftover = handshake(self.port)
                self.sessions += 1
                client.sendall(leftover)
                self._relay(client)

    def _relay(self, client: socket.socket) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([client, self.port], [], [], 0.2)
            if client in ready:
                data = client.recv(65536)
                if not data:
                    return  # the next client connection starts a new session
                self.port.sendall(data)
            if self.port in ready:
                data = self.port.recv(65536)
                if data:
                    client.sendall(data)
