"""virtio-serial and vsock relays, over socketpairs and unix sockets."""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fake_links import FakeLinks
from agent_grpc import agent_server, stubs
from agent_host_side import HostConnector, Rejected, handshake
from agent_scene import lan_team
from hypothesis import given, settings
from hypothesis import strategies as st
from ptmig.v1 import guest_agent_pb2 as pb

from guest_agent.transports import serial_session as wire
from guest_agent.transports.virtio_serial import SerialRelay
from guest_agent.transports.vsock import StreamRelay, open_listener


class EchoServer:
    """Stands in for the gRPC socket: greets each connection with its number, echoes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.received: list[bytearray] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(8)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.received.append(bytearray())
            threading.Thread(
                target=self._echo, args=(conn, len(self.received)), daemon=True
            ).start()

    def _echo(self, conn: socket.socket, number: int) -> None:
        with conn, contextlib.suppress(OSError):  # the relay may close it first
            conn.sendall(f"conn{number}:".encode())
            while data := _recv(conn):
                self.received[number - 1] += data
                conn.sendall(data)

    def close(self) -> None:
        self._listener.close()


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def read_exactly(sock: socket.socket, size: int, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    buf = b""
    while len(buf) < size:
        ready, _, _ = select.select([sock], [], [], max(0, deadline - time.monotonic()))
        if not ready:
            raise TimeoutError(f"got {len(buf)} of {size} bytes: {buf[:80]!r}")
        data = sock.recv(size - len(buf))
        if not data:
            raise ConnectionError("closed")
        buf += data
    return buf


def quiet(sock: socket.socket, wait: float = 0.3) -> bool:
    ready, _, _ = select.select([sock], [], [], wait)
    return not ready


class Port:
    """An emulated virtio-serial port: the relay gets one end, the test is the host."""

    def __init__(self, target: str, guest_sndbuf: int | None = None) -> None:
        self.host, guest = socket.socketpair()
        if guest_sndbuf:
            guest.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, guest_sndbuf)
            self.host.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, guest_sndbuf)
        fd = os.dup(guest.fileno())
        guest.close()
        os.set_blocking(fd, False)
        opened = iter([fd])
        self.relay = SerialRelay(lambda: next(opened), target, "test-port")
        self.thread = threading.Thread(target=self.relay.serve, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.relay.stop()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive()
        self.host.close()


@pytest.fixture
def echo(short_tmp: Path) -> Iterator[EchoServer]:
    server = EchoServer(str(short_tmp / "echo.sock"))
    yield server
    server.close()


@pytest.fixture
def port(echo: EchoServer) -> Iterator[Port]:
    p = Port(echo.path)
    yield p
    p.close()


def hello(session: bytes = b"S" * 16, version: int = wire.VERSION) -> bytes:
    return wire.encode(wire.FrameType.HELLO, session, version)


# -- wire format ------------------------------------------------------------------


def test_frame_round_trip_and_layout() -> None:
    frame = hello(bytes(range(16)))
    assert len(frame) == wire.FRAME_SIZE == 32
    assert frame.startswith(b"\xffPTMIGS\x00\x01\x01\x00\x00")
    assert wire.decode(frame) == wire.Frame(wire.FrameType.HELLO, bytes(range(16)))
    corrupt = frame[:20] + b"X" + frame[21:]
    assert wire.decode(corrupt) is None
    assert wire.find(b"junk" + corrupt + b"more" + frame, wire.FrameType.HELLO) == (
        4 + 32 + 4,
        wire.Frame(wire.FrameType.HELLO, bytes(range(16))),
    )
    (crc,) = struct.unpack(">I", frame[28:])
    assert crc == __import__("zlib").crc32(frame[:28])


@settings(max_examples=200, deadline=None)
@given(
    garbage=st.binary(max_size=200),
    trailing=st.binary(max_size=100),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_scanner_finds_a_split_hello_and_hands_every_byte_on(
    garbage: bytes, trailing: bytes, cuts: list[int]
) -> None:
    frame = hello(b"0123456789abcdef")
    stream = garbage + frame + trailing
    points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points)]
    scanner = wire.Scanner(wire.FrameType.HELLO)
    before, after, found = b"", b"", []
    for chunk in chunks:
        if found:
            after += chunk
            continue
        out, frame_seen, rest = scanner.scan(chunk)
        before += out
        if frame_seen:
            found.append(frame_seen)
            after += rest
    assert found == [wire.Frame(wire.FrameType.HELLO, b"0123456789abcdef")]
    assert before.startswith(garbage) and frame.startswith(before[len(garbage) :])
    assert after == trailing


# -- virtio-serial relay ------------------------------------------------------------


def test_garbage_before_hello_is_discarded(port: Port, echo: EchoServer) -> None:
    port.host.sendall(b"stale bytes of an old session \xffPTMI" + hello())
    assert read_exactly(port.host, 32) == wire.encode(wire.FrameType.ACK, b"S" * 16)
    port.host.sendall(b"ping")
    assert read_exactly(port.host, 10) == b"conn1:ping"
    assert bytes(echo.received[0]) == b"ping"


def test_hello_split_byte_by_byte(port: Port) -> None:
    for byte in b"noise" + hello():
        port.host.send(bytes([byte]))
    assert wire.decode(read_exactly(port.host, 32)) == wire.Frame(wire.FrameType.ACK, b"S" * 16)


def test_corrupt_hello_is_ignored(port: Port, echo: EchoServer) -> None:
    bad = bytearray(hello())
    bad[-1] ^= 1
    port.host.sendall(bytes(bad) + b"data")
    assert quiet(port.host)
    assert echo.received == []


def test_new_hello_without_eof_starts_a_fresh_connection(port: Port, echo: EchoServer) -> None:
    """The reconnect the guest cannot see: old bytes, then the next HELLO, back to back."""
    port.host.sendall(hello(b"A" * 16))
    read_exactly(port.host, 32)
    port.host.sendall(b"one")
    assert read_exactly(port.host, 9) == b"conn1:one"
    port.host.sendall(b"late-old-bytes" + hello(b"B" * 16) + b"two")
    leftover = handshake_reply(port.host, b"B" * 16)
    assert leftover + read_exactly(port.host, 9 - len(leftover)) == b"conn2:two"
    assert bytes(echo.received[1]) == b"two"  # nothing of the old session reached it
    assert quiet(port.host)


def handshake_reply(sock: socket.socket, session: bytes) -> bytes:
    """Read up to our ACK, skipping the old session's echo; return what follows."""
    buf = b""
    while (found := wire.find(buf, wire.FrameType.ACK)) is None or found[1].session != session:
        buf += read_exactly(sock, 1)
    return buf[found[0] + 32 :]


def test_unsupported_version_and_missing_server_are_rejected(short_tmp: Path) -> None:
    p = Port(str(short_tmp / "nobody.sock"))
    try:
        p.host.sendall(hello(b"V" * 16, version=9))
        assert wire.decode(read_exactly(p.host, 32)) == wire.Frame(wire.FrameType.REJECT, b"V" * 16)
        with pytest.raises(Rejected):
            handshake(p.host)
    finally:
        p.close()


def test_partial_writes_large_transfer(echo: EchoServer) -> None:
    p = Port(echo.path, guest_sndbuf=4096)
    try:
        p.host.sendall(hello())
        read_exactly(p.host, 32)
        payload = os.urandom(2 * 1024 * 1024)
        sender = threading.Thread(target=p.host.sendall, args=(payload,))
        sender.start()
        got = read_exactly(p.host, 6 + len(payload), timeout=30)
        sender.join()
        assert got == b"conn1:" + payload
    finally:
        p.close()


def test_host_eof_leaves_the_relay_serving(port: Port) -> None:
    port.host.sendall(hello())
    read_exactly(port.host, 32)
    port.host.shutdown(socket.SHUT_WR)  # reads on the guest side now return EOF forever
    time.sleep(0.3)  # a window for the relay to (wrongly) end on that EOF
    assert port.thread.is_alive()
    started = time.monotonic()
    port.relay.stop()
    port.thread.join(timeout=2)
    assert time.monotonic() - started < 1


def test_real_grpc_client_through_the_relay_twice(fake: FakeLinks, short_tmp: Path) -> None:
    for index in range(300):  # a GetState answer far larger than the port's buffer
        fake.add(
            f"veth{index}", mac=f"02:00:00:00:{index // 256:02x}:{index % 256:02x}", kind="veth"
        )
    sock = str(short_tmp / "agent.sock")
    with agent_server(sock, fake, [lan_team()], max_message_bytes=1024 * 1024):
        p = Port(sock, guest_sndbuf=4096)
        connector = HostConnector(str(short_tmp / "host.sock"), p.host)
        try:
            for attempt in range(2):  # own subchannel pool: a new connection each time
                with stubs(f"unix:{connector.path}", private=True) as (stub, health):
                    reply = stub.GetState(
                        pb.GetStateRequest(operation_id=f"s{attempt}"), timeout=10
                    )
                    assert len(reply.links) > 300
                    assert health.Check(pb.HealthCheckRequest(), timeout=5).status == 1
            assert connector.sessions == 2
        finally:
            connector.close()
            p.close()


# -- vsock relay ----------------------------------------------------------------------


def unix_listener(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    return listener


@pytest.fixture
def stream_relay(short_tmp: Path, echo: EchoServer) -> Iterator[str]:
    path = str(short_tmp / "vsock-standin.sock")
    listener = unix_listener(path)  # bound before the test connects
    relay = StreamRelay(lambda: listener, echo.path, "test-vsock")
    thread = threading.Thread(target=relay.serve, daemon=True)
    thread.start()
    yield path
    relay.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def test_stream_relay_gives_each_connection_its_own_upstream(stream_relay: str) -> None:
    with connect(stream_relay) as one, connect(stream_relay) as two:
        one.sendall(b"a")
        first = read_exactly(one, 7)
        two.sendall(b"b")
        second = read_exactly(two, 7)
        assert {first, second} == {b"conn1:a", b"conn2:b"}


def test_stream_relay_survives_a_reset_connection(stream_relay: str) -> None:
    victim = connect(stream_relay)
    victim.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    victim.close()  # like a migration resetting the host's vsock connection
    with connect(stream_relay) as again:
        again.sendall(b"x")
        assert read_exactly(again, 7).endswith(b":x")


def test_stream_relay_passes_half_close(stream_relay: str) -> None:
    with connect(stream_relay) as sock:
        sock.sendall(b"bye")
        sock.shutdown(socket.SHUT_WR)
        assert read_exactly(sock, 9) == b"conn1:bye"
        assert sock.recv(10) == b""  # the upstream saw EOF and closed


def test_grpc_through_stream_relay(fake: FakeLinks, short_tmp: Path) -> None:
    sock = str(short_tmp / "agent.sock")
    front = str(short_tmp / "front.sock")
    with agent_server(sock, fake, [lan_team()]):
        listener = unix_listener(front)
        relay = StreamRelay(lambda: listener, sock)
        thread = threading.Thread(target=relay.serve, daemon=True)
        thread.start()
        try:
            for attempt in range(2):
                with stubs(f"unix:{front}", private=True) as (stub, _):
                    assert stub.GetState(pb.GetStateRequest(operation_id=str(attempt))).teams
        finally:
            relay.stop()
            thread.join(timeout=5)


def vsock_loopback_reason() -> str | None:
    try:
        listener = open_listener(0x7031, cid=1)  # VMADDR_CID_LOCAL
    except (OSError, AttributeError) as exc:
        return f"no AF_VSOCK loopback here (vsock_loopback module not loaded?): {exc}"
    listener.close()
    return None


@pytest.mark.skipif(vsock_loopback_reason() is not None, reason=str(vsock_loopback_reason()))
def test_grpc_over_real_vsock_loopback(fake: FakeLinks, short_tmp: Path) -> None:
    sock = str(short_tmp / "agent.sock")
    with agent_server(sock, fake, [lan_team()]):
        vsock_listener = open_listener(0x7031, cid=1)
        relay = StreamRelay(lambda: vsock_listener, sock)
        thread = threading.Thread(target=relay.serve, daemon=True)
        thread.start()
        try:
            with socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM) as client:
                client.connect((1, 0x7031))
                client.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                assert read_exactly(client, 9)  # the server's SETTINGS frame header
        finally:
            relay.stop()
            thread.join(timeout=5)


def test_stream_relay_retries_until_it_can_listen(
    short_tmp: Path, echo: EchoServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("guest_agent.transports.vsock.REOPEN_S", 0.05)
    path = str(short_tmp / "late.sock")
    attempts: list[int] = []

    def late_listener() -> socket.socket:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError(19, "No such device")  # no vsock device yet
        return unix_listener(path)

    relay = StreamRelay(late_listener, echo.path)
    thread = threading.Thread(target=relay.serve, daemon=True)
    thread.start()
    try:
        # The socket file appears at bind(), a moment before listen(): retry refusals.
        deadline = time.monotonic() + 5
        while True:
            try:
                sock = connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert time.monotonic() < deadline, "the relay never listened"
                time.sleep(0.02)
        with sock:
            sock.sendall(b"hi")
            assert read_exactly(sock, 8) == b"conn1:hi"
    finally:
        relay.stop()
        thread.join(timeout=5)
    assert len(attempts) == 3 and not thread.is_alive()
