"""Bounded fuzz runs of the agent: its gRPC request handling and its virtio-serial relay.

agent-grpc: a real agent gRPC server on a unix socket over the fake links gets
structured requests with hostile fields, valid requests' bytes mutated, raw bytes
and unknown or oversized calls.  Every answer must be a reply or a status other
than UNKNOWN and the agent's own "internal error" (both mean an exception got
through), nothing may be logged as an unexpected failure, and a valid request
must be answered after each input.

virtio-serial: the guest's relay on one end of a socketpair, in front of the same
agent, gets random streams: garbage, HELLOs good, truncated, corrupted or of
another version, ACK/REJECT frames, HTTP/2 bytes, cut at random points.  After
each, the thread must still run, and a fresh HELLO must get its ACK and then the
gRPC server's SETTINGS frame through the relay.

Both check that resident memory does not keep growing.  Sizes and seeds are in
the "fuzz" section of pytest's summary.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agent_fake_links import FakeLinks
from agent_grpc import agent_server, stubs
from agent_host_side import handshake
from agent_scene import NEW_MAC, NEW_PCI, OLD_MAC, OLD_PCI, build_scene, lan_team
from fuzzing import fuzz, rss_bytes
from hypothesis import strategies as st
from ptmig.v1 import guest_agent_pb2 as pb

from guest_agent.teams import DeviceMatch
from guest_agent.transports import serial_session as wire
from guest_agent.transports.virtio_serial import SerialRelay

MAX_MESSAGE = 64 * 1024
MEMORY_GROWTH_LIMIT = 64 * 1024 * 1024
CALL_TIMEOUT = 0.3  # the agent answers its own deadline 0.2 s before
OTHER = lan_team(name="db", bond="bond1", standby=DeviceMatch(name="enp5s0"), mac=None)
METHODS = {
    "/ptmig.v1.GuestAgent/GetVersion": pb.GetVersionRequest,
    "/ptmig.v1.GuestAgent/GetState": pb.GetStateRequest,
    "/ptmig.v1.GuestAgent/UseStandby": pb.UseStandbyRequest,
    "/ptmig.v1.GuestAgent/BindPrimary": pb.BindPrimaryRequest,
    "/ptmig.v1.Health/Check": pb.HealthCheckRequest,
}


class Unexpected(logging.Handler):
    """Collects ERROR records: the servicer logs every exception that got through."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def agent(short_tmp: Path) -> Iterator[tuple[str, FakeLinks, Unexpected]]:
    links = FakeLinks()
    build_scene(links)
    links.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    path = str(short_tmp / "agent.sock")
    unexpected = Unexpected()
    logger = logging.getLogger("guest_agent")
    logger.addHandler(unexpected)
    try:
        with agent_server(
            path, links, [lan_team(), OTHER], max_message_bytes=MAX_MESSAGE, default_timeout_s=0.02
        ):
            yield path, links, unexpected
    finally:
        logger.removeHandler(unexpected)
        links.close()


# -- agent-grpc --------------------------------------------------------------------------

TEXT = st.one_of(
    st.sampled_from(
        [
            "",
            "lan",
            "db",
            "op-1",
            "op-2",
            NEW_PCI,
            OLD_PCI,
            "03:00.0",
            NEW_MAC,
            OLD_MAC,
            "52:54:00:dd:00:05",
            "ff:ff:ff:ff:ff:ff",
            "x" * 2000,
        ]
    ),
    st.text(max_size=16),
)
TIMEOUTS = st.sampled_from([0, 1, 1, 1, 5, 2**32 - 1])  # 0: the agent default, 20 ms
STRUCTURED = st.one_of(
    st.builds(pb.GetVersionRequest, operation_id=TEXT),
    st.builds(pb.GetStateRequest, operation_id=TEXT),
    st.builds(
        pb.UseStandbyRequest,
        operation_id=TEXT,
        team=TEXT,
        release_primary=st.booleans(),
        timeout_ms=TIMEOUTS,
    ),
    st.builds(
        pb.BindPrimaryRequest,
        operation_id=TEXT,
        team=TEXT,
        pci_address=TEXT,
        mac=TEXT,
        mac_policy=st.integers(-(2**31), 2**31 - 1),
        timeout_ms=TIMEOUTS,
    ),
    st.builds(pb.HealthCheckRequest, service=TEXT),
)


@st.composite
def mutated_bytes(draw: st.DrawFn) -> bytes:
    """A valid request's bytes with bytes flipped, inserted, cut or repeated."""
    data = bytearray(draw(STRUCTURED).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "cut", "repeat"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            data[at % len(data)] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "repeat":
            data += data[at:]
    return bytes(data)


NORMAL_INPUTS = st.one_of(
    st.tuples(st.just("message"), STRUCTURED),
    st.tuples(st.just("bytes"), st.tuples(st.sampled_from(sorted(METHODS)), mutated_bytes())),
    st.tuples(
        st.just("bytes"), st.tuples(st.sampled_from(sorted(METHODS)), st.binary(max_size=64))
    ),
    st.tuples(
        st.just("bytes"),
        st.tuples(
            st.sampled_from(["/ptmig.v1.GuestAgent/Nope", "/grpc.health.v1.Health/Check", "/", ""]),
            st.binary(max_size=16),
        ),
    ),
)
# Larger than the agent's limit: RESOURCE_EXHAUSTED and a new connection, ~0.1 s each.
OVERSIZED = st.tuples(
    st.just("bytes"),
    st.tuples(st.sampled_from(sorted(METHODS)), st.just(b"\x0a" + b"\xff" * MAX_MESSAGE)),
)
GRPC_INPUTS = st.integers(0, 49).flatmap(lambda n: OVERSIZED if n == 0 else NORMAL_INPUTS)
ACCEPTABLE = set(grpc.StatusCode) - {grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK}


def test_fuzz_agent_grpc(agent: tuple[str, FakeLinks, Unexpected]) -> None:
    path, _links, unexpected = agent
    with grpc.insecure_channel(f"unix:{path}") as channel:
        raw = {
            method: channel.unary_unary(method)
            for method in [
                *METHODS,
                "/ptmig.v1.GuestAgent/Nope",
                "/grpc.health.v1.Health/Check",
                "/",
                "",
            ]
        }
        typed = {
            method: channel.unary_unary(
                method,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=lambda b: b,
            )
            for method in METHODS
        }
        by_type = {request_type: method for method, request_type in METHODS.items()}
        probe = pb.GetVersionRequest(operation_id="probe")
        typed["/ptmig.v1.GuestAgent/GetVersion"](probe, timeout=5)  # warm up before measuring
        rss_before = rss_bytes()

        def one(item: tuple[str, Any]) -> None:
            kind, value = item
            try:
                if kind == "message":
                    typed[by_type[type(value)]](value, timeout=CALL_TIMEOUT)
                else:
                    method, data = value
                    raw[method](data, timeout=CALL_TIMEOUT)
            except grpc.RpcError as exc:
                assert exc.code() in ACCEPTABLE, (exc.code(), exc.details())
                assert not (exc.details() or "").startswith("internal error"), exc.details()
            assert not unexpected.records, unexpected.records[0].getMessage()
            reply = pb.GetVersionResponse.FromString(
                typed["/ptmig.v1.GuestAgent/GetVersion"](probe, timeout=5)
            )
            assert reply.api_version == 1

        result = fuzz("agent-grpc", GRPC_INPUTS, one)
        with stubs(f"unix:{path}") as (stub, _health):
            assert stub.GetState(pb.GetStateRequest(operation_id="after"), timeout=5).teams
        growth = rss_bytes() - rss_before
        result.notes.append(f"RSS +{growth // 1024} KiB")
        assert growth < MEMORY_GROWTH_LIMIT


# -- virtio-serial -----------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


@st.composite
def frame(draw: st.DrawFn) -> bytes:
    session = draw(st.binary(min_size=16, max_size=16))
    kind = draw(st.sampled_from(list(wire.FrameType)))
    version = draw(st.sampled_from([wire.VERSION, wire.VERSION, 0, 2, 255]))
    data = bytearray(wire.encode(kind, session, version))
    how = draw(st.sampled_from(["whole", "whole", "truncated", "corrupt", "magic-only"]))
    if how == "truncated":
        return bytes(data[: draw(st.integers(0, wire.FRAME_SIZE - 1))])
    if how == "corrupt":
        data[draw(st.integers(0, wire.FRAME_SIZE - 1))] ^= draw(st.integers(1, 255))
    if how == "magic-only":
        return wire.MAGIC
    return bytes(data)


CHUNK = st.one_of(
    frame(),
    st.binary(max_size=64),
    st.sampled_from(
        [PREFACE, PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00", b"\xff" * 40, b"\x00" * 4096]
    ),
)
SERIAL_INPUTS = st.tuples(st.lists(CHUNK, max_size=8), st.lists(st.integers(1, 97), max_size=4))


class Port:
    """One end of a socketpair is the relay's port; the test holds the host's end."""

    def __init__(self, target: str) -> None:
        self.host, guest = socket.socketpair()
        fd = os.dup(guest.fileno())
        guest.close()
        os.set_blocking(fd, False)
        opened = iter([fd])
        self.relay = SerialRelay(lambda: next(opened), target, "fuzz-port")
        self.thread = threading.Thread(target=self.relay.serve, daemon=True)
        self.thread.start()

    def drain(self) -> None:
        while select.select([self.host], [], [], 0)[0]:
            if not self.host.recv(65536):
                return

    def close(self) -> None:
        self.relay.stop()
        self.thread.join(timeout=5)
        self.host.close()


def read_frame_header(sock: socket.socket, already: bytes, timeout: float = 5.0) -> bytes:
    buf = already
    deadline = time.monotonic() + timeout
    while len(buf) < 9:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no answer from the gRPC server through the relay ({buf!r})"
        data = sock.recv(65536)
        assert data, "port closed"
        buf += data
    return buf[:9]


def test_fuzz_virtio_serial_relay(agent: tuple[str, FakeLinks, Unexpected]) -> None:
    path, _links, _unexpected = agent
    port = Port(path)
    try:
        handshake(port.host)  # warm up before measuring
        rss_before = rss_bytes()

        def one(item: tuple[list[bytes], list[int]]) -> None:
            chunks, cuts = item
            stream = b"".join(chunks)
            points = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
            for start, end in itertools.pairwise(points):
                port.host.sendall(stream[start:end])
                port.drain()
            assert port.thread.is_alive()
            after = handshake(port.host, timeout=5)
            port.host.sendall(PREFACE)
            header = read_frame_header(port.host, after)
            assert header[3] == 0x04, f"first frame is not SETTINGS: {header!r}"  # RFC 9113
            port.drain()

        result = fuzz("virtio-serial", SERIAL_INPUTS, one)
        growth = rss_bytes() - rss_before
        result.notes.append(f"RSS +{growth // 1024} KiB")
        assert growth < MEMORY_GROWTH_LIMIT
        assert port.thread.is_alive()
    finally:
        port.close()
