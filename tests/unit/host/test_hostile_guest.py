"""An untrusted guest against the coordinator's real agent channel, and against the workflow.

The host side is the real :class:`host.agent_client.AgentClient` and its virtio-serial
:class:`~host.agent_client.SerialRelay` over real unix sockets; the guest is a thread of
the test playing QEMU's end of the channel socket: silent, stuck after the handshake,
flooding, or a real gRPC GuestAgent server (behind the handshake) that answers with lies.
Every failure must be an :class:`AgentError` with the right code, within a bound that
follows from the configured deadline, with no relay thread left behind.

Then, over the in-memory world: a domain whose agent never answers fails (rolled back,
or refused) at its deadline, while another domain migrating at the same time is done long
before that deadline.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from ptmig import serial_session as wire
from ptmig.v1 import guest_agent_pb2 as pb
from ptmig.v1 import guest_agent_pb2_grpc as pb_grpc
from workflow_fakes import VM1, VM2, A, B, World

from host.agent_client import (
    DEADLINE_GRACE,
    MAX_LINKS,
    MAX_TEAMS,
    AgentClient,
    AgentEndpoint,
    AgentError,
    ChannelReader,
    SerialRelay,
)
from host.agent_client.client import MAX_REPLY_BYTES
from host.agent_client.relay import (
    HANDSHAKE_TIMEOUT,
    MAX_HANDSHAKE_DISCARD,
    READER_BACKLOG,
    handshake,
)
from host.workflow.coordinator import Coordinator
from host.workflow.errors import PreflightError
from host.workflow.journal import Journal
from host.workflow.model import MigrationReport, MigrationRequest, Outcome

#: Slack on every time bound: scheduling on a loaded CI machine, not the product.
SLACK = 1.0
#: What a session may have in flight beyond the reader's backlog: the two ends' socket
#: buffers (a few hundred KiB each on Linux) and a chunk in hand, generously.
BUFFERS = 4 << 20


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


Behaviour = Callable[["GuestConn"], None]


# -- the hostile guest ------------------------------------------------------------------


class GuestConn:
    """One host connection to the channel socket, as the guest side sees it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = 0
        self.ended = threading.Event()

    def hello(self, timeout: float = 5.0) -> bytes:
        """Read up to the host's HELLO; its session id."""
        buf = b""
        deadline = time.monotonic() + timeout
        while (found := wire.find(buf, wire.FrameType.HELLO)) is None:
            ready, _, _ = select.select([self.sock], [], [], deadline - time.monotonic())
            data = self.sock.recv(4096) if ready else b""
            if not data:
                raise ConnectionError("no HELLO")
            buf += data
        return found[1].session

    def ack(self, session: bytes, then: bytes = b"") -> None:
        self.sock.sendall(wire.encode(wire.FrameType.ACK, session) + then)

    def flood(self, chunk: bytes) -> None:
        """Write *chunk* again and again until the host stops the connection."""
        with contextlib.suppress(OSError):
            while True:
                self.sent += self.sock.send(chunk)

    def drain(self) -> None:
        """Read and drop whatever the host sends, until it hangs up."""
        with contextlib.suppress(OSError):
            while self.sock.recv(65536):
                pass


class HostileGuest:
    """QEMU's end of a virtio-serial channel socket, each connection run by *behave*."""

    def __init__(self, path: str, behave: Behaviour) -> None:
        self.path = path
        self.behave = behave
        self.conns: list[GuestConn] = []
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(16)
        self._accepter = threading.Thread(target=self._accept, name="hostile-guest", daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            conn = GuestConn(sock)
            self.conns.append(conn)
            t = threading.Thread(
                target=self._run, args=(conn,), name="hostile-guest-conn", daemon=True
            )
            self._threads.append(t)
            t.start()

    def _run(self, conn: GuestConn) -> None:
        try:
            self.behave(conn)
        except OSError:
            pass
        finally:
            conn.ended.set()
            conn.sock.close()

    def stream(self) -> UnixStream:
        return UnixStream(self.path)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        self._accepter.join(5)
        for t in self._threads:
            t.join(5)


def relay_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("agent-") and t.is_alive()]


@pytest.fixture
def no_relay_threads_left() -> Iterator[None]:
    """After the test: every relay, reader and watchdog thread it started has ended."""
    before = set(relay_threads())
    yield
    deadline = time.monotonic() + 2.0
    for thread in set(relay_threads()) - before:
        thread.join(max(0.0, deadline - time.monotonic()))
    left = set(relay_threads()) - before
    assert not left, f"threads left running: {sorted(t.name for t in left)}"


@pytest.fixture
def guest_at(
    short_tmp: Path, no_relay_threads_left: None
) -> Iterator[Callable[[Behaviour], HostileGuest]]:
    guests: list[HostileGuest] = []

    def start(behave: Behaviour) -> HostileGuest:
        guests.append(HostileGuest(str(short_tmp / f"chan{len(guests)}.sock"), behave))
        return guests[-1]

    yield start
    for g in guests:
        g.close()


@contextlib.contextmanager
def client_of(guest: HostileGuest, call_timeout: float) -> Iterator[AgentClient]:
    with AgentClient(AgentEndpoint(serial=guest.stream), call_timeout) as client:
        yield client


def fails(call: Callable[[], object]) -> tuple[AgentError, float]:
    """The AgentError *call* raises, and how long it took to."""
    started = time.monotonic()
    with pytest.raises(AgentError) as info:
        call()
    return info.value, time.monotonic() - started


# -- behaviours ------------------------------------------------------------------------


def silent(conn: GuestConn) -> None:
    """Reads the HELLO and everything after it; never answers."""
    conn.drain()


def acks_then_silent(conn: GuestConn) -> None:
    """Completes the handshake, then never says a word of HTTP/2 (but reads)."""
    conn.ack(conn.hello())
    conn.drain()


def floods_before_ack(conn: GuestConn) -> None:
    conn.hello()
    conn.flood(os.urandom(65536))


def floods_after_ack(conn: GuestConn) -> None:
    conn.ack(conn.hello())
    conn.flood(os.urandom(65536))


def h2_frame(kind: int, payload: bytes = b"", flags: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + bytes(4) + payload


def pings_and_never_reads(conn: GuestConn) -> None:
    """A valid HTTP/2 server start (SETTINGS), then endless PINGs, each of which gRPC must
    answer; the answers are never read, so gRPC's writes back up."""
    conn.ack(conn.hello(), then=h2_frame(4))
    conn.flood(h2_frame(6, b"8 bytes!") * 4096)


# -- (a), (b): a guest that does not answer ------------------------------------------------


def test_a_guest_that_never_answers_the_handshake_fails_the_call_at_its_deadline(
    guest_at: Callable[[Behaviour], HostileGuest],
) -> None:
    guest = guest_at(silent)
    with client_of(guest, call_timeout=1.0) as client:
        error, took = fails(client.healthy)
    assert error.code == "DEADLINE_EXCEEDED"
    assert took < 1.0 + SLACK
    # closed in the middle of its handshake: no reconnection, no thread, afterwards
    connections = len(guest.conns)
    time.sleep(0.3)  # a window for a reconnection to show: there must be none
    assert len(guest.conns) == connections == 1
    assert guest.conns[0].ended.wait(1.0), "the relay kept the guest's connection open"


def test_a_guest_that_completes_the_handshake_then_says_nothing(
    guest_at: Callable[[Behaviour], HostileGuest],
) -> None:
    guest = guest_at(acks_then_silent)
    with client_of(guest, call_timeout=1.0) as client:
        error, took = fails(lambda: client.state())
        assert error.code == "DEADLINE_EXCEEDED" and took < 1.0 + SLACK
        error, took = fails(lambda: client.state(timeout=0.5))  # the next call: same
        assert error.code == "DEADLINE_EXCEEDED" and took < 0.5 + SLACK
    assert all(c.ended.wait(1.0) for c in guest.conns)


# -- (c): a guest that floods the channel ------------------------------------------------


def test_a_flood_instead_of_the_handshake_is_cut_off_after_a_bounded_read(
    guest_at: Callable[[Behaviour], HostileGuest],
) -> None:
    guest = guest_at(floods_before_ack)
    tracemalloc.start()
    try:
        with client_of(guest, call_timeout=2.0) as client:
            error, took = fails(client.healthy)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert error.code == "DEADLINE_EXCEEDED" and took < 2.0 + SLACK
    assert guest.conns and all(c.ended.wait(1.0) for c in guest.conns)
    # each connection was dropped after MAX_HANDSHAKE_DISCARD, not read for 3 s at GB/s
    assert max(c.sent for c in guest.conns) < MAX_HANDSHAKE_DISCARD + BUFFERS
    assert peak < 16 << 20


def test_handshake_scans_a_flood_of_other_sessions_acks_in_linear_time() -> None:
    """Frames that look right but answer another session: each skipped cheaply (it was a
    rescan of the whole buffer per frame: seconds per 64 KiB chunk, deadline unchecked)."""
    host, guest = socket.socketpair()
    stream = UnixStream.over(host)
    reader = ChannelReader(stream)
    junk = wire.encode(wire.FrameType.ACK, b"x" * 16) * 2048  # 64 KiB of foreign ACKs
    feeder = threading.Thread(target=lambda: _feed(guest, junk), daemon=True)
    feeder.start()
    try:
        error, took = fails(lambda: handshake(stream, reader, timeout=5.0))
    finally:
        reader.close()
        stream.close()
        guest.close()
        feeder.join(5)
    assert error.code == "PROTOCOL" and "flooding" in error.message
    assert took < 1.0  # 4 MiB of frames to skip: a bytes.find, not 130 000 decodes
    assert not reader.thread.is_alive() or _joined(reader.thread)


def test_handshake_refuses_a_corrupt_answer_with_our_session_at_once() -> None:
    host, guest = socket.socketpair()
    stream = UnixStream.over(host)
    reader = ChannelReader(stream)

    def answer() -> None:
        session = GuestConn(guest).hello()
        bad = bytearray(wire.encode(wire.FrameType.ACK, session))
        bad[-1] ^= 1
        guest.sendall(bytes(bad))

    threading.Thread(target=answer, daemon=True).start()
    try:
        error, took = fails(lambda: handshake(stream, reader, timeout=3.0))
    finally:
        reader.close()
        stream.close()
        guest.close()
    assert error.code == "PROTOCOL" and took < 1.0


def test_a_flood_after_the_handshake_fails_fast(
    guest_at: Callable[[Behaviour], HostileGuest],
) -> None:
    guest = guest_at(floods_after_ack)
    with client_of(guest, call_timeout=2.0) as client:
        error, took = fails(client.healthy)
    assert error.code in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL")
    assert took < 2.0 + SLACK
    assert all(c.ended.wait(1.0) for c in guest.conns)


def test_a_ping_flood_that_never_reads_the_answers_cannot_outlast_the_deadline(
    guest_at: Callable[[Behaviour], HostileGuest],
) -> None:
    """This wedged gRPC's transport: the call hung past its deadline in most runs (6 of
    10 measured, grpcio 1.85).  The client's watchdog resets the channel."""
    guest = guest_at(pings_and_never_reads)
    for _ in range(3):  # the wedge did not happen every time
        with client_of(guest, call_timeout=1.0) as client:
            error, took = fails(client.healthy)
        assert error.code == "DEADLINE_EXCEEDED"
        assert took < 1.0 + DEADLINE_GRACE + SLACK
    assert all(c.ended.wait(1.0) for c in guest.conns)


def test_the_relay_reads_no_further_than_its_backlog_when_grpc_does_not_read(
    guest_at: Callable[[Behaviour], HostileGuest],
) -> None:
    """Backpressure: with nobody consuming, a flooding guest blocks on its own writes
    (the reader's queue was unbounded: it read as fast as the guest wrote)."""
    guest = guest_at(floods_after_ack)
    relay = SerialRelay(guest.stream)
    consumer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    consumer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        consumer.connect(relay.path)  # like gRPC, but it never reads
        deadline = time.monotonic() + 3
        while not guest.conns and time.monotonic() < deadline:
            time.sleep(0.01)
        # The guest's progress over time is the behaviour: it must stop, not slow down.
        time.sleep(0.5)
        first = guest.conns[0].sent
        time.sleep(0.5)
        settled = guest.conns[0].sent
    finally:
        consumer.close()
        relay.close()
    assert settled == first, "the relay kept reading"
    assert settled < READER_BACKLOG * 65536 + BUFFERS
    assert guest.conns[0].ended.wait(1.0)


# -- (d): a real gRPC agent that lies -----------------------------------------------------


def team(name: str = "lan", **fields: Any) -> pb.TeamState:
    base: dict[str, Any] = dict(
        name=name,
        bond="bond0",
        bond_present=True,
        mac="52:54:00:aa:00:01",
        active_member="enp1s0",
        standby="enp1s0",
        members=["enp1s0", "enp3s0"],
        primary="enp3s0",
    )
    return pb.TeamState(**{**base, **fields})


def state(
    links: int = 2, teams: list[pb.TeamState] | None = None, **link: Any
) -> pb.GetStateResponse:
    reply = pb.GetStateResponse(teams=teams if teams is not None else [team()])
    for n in range(links):
        fields: dict[str, Any] = dict(
            name=f"enp{n + 1}s0",
            index=n + 2,
            mac=f"52:54:00:aa:{n >> 8 & 255:02x}:{n & 255:02x}",
            pci_address=f"0000:{n + 1:02x}:00.0",
            carrier=True,
        )
        reply.links.add(**{**fields, **(link if n == 0 else {})})
    return reply


class LyingAgent(pb_grpc.GuestAgentServicer):  # type: ignore[misc]
    """Answers every call with what the test set, or sleeps past the caller's deadline."""

    def __init__(self) -> None:
        self.replies: dict[str, Any] = {}
        self.sleep = 0.0

    def _answer(self, method: str, default: Any) -> Any:
        if self.sleep:
            time.sleep(self.sleep)
        return self.replies.get(method, default)

    def GetVersion(self, request: Any, context: Any) -> Any:
        return self._answer("GetVersion", pb.GetVersionResponse(agent_version="0.1"))

    def GetState(self, request: Any, context: Any) -> Any:
        return self._answer("GetState", state())

    def UseStandby(self, request: Any, context: Any) -> Any:
        return self._answer("UseStandby", pb.UseStandbyResponse(team=team(request.team)))

    def BindPrimary(self, request: Any, context: Any) -> Any:
        return self._answer(
            "BindPrimary", pb.BindPrimaryResponse(team=team(request.team), device="enp3s0")
        )


class LyingGuest:
    """A gRPC server with :class:`LyingAgent` on a unix socket, and the guest's end of
    the channel: each host connection is handshaken and then piped to that server."""

    def __init__(self, tmp: Path, start: Callable[[Behaviour], HostileGuest]) -> None:
        self.agent = LyingAgent()
        self.grpc_path = str(tmp / "agent.sock")
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[("grpc.max_send_message_length", 8 << 20)],
        )
        pb_grpc.add_GuestAgentServicer_to_server(self.agent, self.server)
        self.server.add_insecure_port(f"unix:{self.grpc_path}")
        self.server.start()
        self.channel = start(self._serve)

    def _serve(self, conn: GuestConn) -> None:
        conn.ack(conn.hello())
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as upstream:
            upstream.connect(self.grpc_path)
            ends = [conn.sock, upstream]
            while True:
                ready, _, _ = select.select(ends, [], [], 5.0)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    (upstream if sock is conn.sock else conn.sock).sendall(data)

    def stop(self) -> None:
        self.server.stop(None).wait()


@pytest.fixture
def liar(short_tmp: Path, guest_at: Callable[[Behaviour], HostileGuest]) -> Iterator[LyingGuest]:
    guest = LyingGuest(short_tmp, guest_at)
    yield guest
    guest.stop()


def test_an_honest_answer_goes_through_the_same_path(liar: LyingGuest) -> None:
    """The stand-in is a working agent: what fails below fails for the lie alone."""
    with client_of(liar.channel, call_timeout=2.0) as client:
        assert [t.name for t in client.state().teams] == ["lan"]
        assert client.use_standby("lan", release_primary=True, operation_id="o").team.name == "lan"
        assert client.bind_primary("lan", operation_id="p", mac="52:54:00:aa:00:02").device


def _big_state() -> pb.GetStateResponse:
    reply = state()
    reply.links[0].operstate = "U" * (MAX_REPLY_BYTES + 1)
    return reply


LIES: dict[str, tuple[str, Any, str]] = {
    # name: (method, reply, expected code)
    "oversized reply": ("GetState", _big_state(), "RESOURCE_EXHAUSTED"),
    "too many links": ("GetState", state(links=MAX_LINKS + 1), "PROTOCOL"),
    "too many teams": (
        "GetState",
        state(teams=[team(f"t{n}") for n in range(MAX_TEAMS + 1)]),
        "PROTOCOL",
    ),
    "duplicate teams": ("GetState", state(teams=[team(), team()]), "PROTOCOL"),
    "escape in a link name": ("GetState", state(name="eth\x1b[2J"), "PROTOCOL"),
    "link name too long": ("GetState", state(name="e" * 16), "PROTOCOL"),
    "invalid MAC": ("GetState", state(mac="52:54:00:aa:00:zz"), "PROTOCOL"),
    "invalid permanent MAC": ("GetState", state(permanent_mac="not a mac"), "PROTOCOL"),
    "invalid PCI address": ("GetState", state(pci_address="0000:00:1f.8"), "PROTOCOL"),
    "active member outside the bond": (
        "GetState",
        state(teams=[team(active_member="enp9s0")]),
        "PROTOCOL",
    ),
    "primary outside the bond": ("GetState", state(teams=[team(primary="enp9s0")]), "PROTOCOL"),
    "too many members": (
        "GetState",
        state(teams=[team(members=[f"m{n}" for n in range(9)])]),
        "PROTOCOL",
    ),
    "switched another team": ("UseStandby", pb.UseStandbyResponse(team=team("wan")), "PROTOCOL"),
    "switched to a member outside the bond": (
        "UseStandby",
        pb.UseStandbyResponse(team=team(active_member="enp7s0")),
        "PROTOCOL",
    ),
    "bound a nameless device": (
        "BindPrimary",
        pb.BindPrimaryResponse(team=team(), device=""),
        "PROTOCOL",
    ),
    "bound another team": (
        "BindPrimary",
        pb.BindPrimaryResponse(team=team("wan"), device="enp3s0"),
        "PROTOCOL",
    ),
    "too many capabilities": (
        "GetVersion",
        pb.GetVersionResponse(capabilities=[str(n) for n in range(65)]),
        "PROTOCOL",
    ),
}

CALLS: dict[str, Callable[[AgentClient], object]] = {
    "GetState": lambda c: c.state(),
    "GetVersion": lambda c: c.version(),
    "UseStandby": lambda c: c.use_standby("lan", release_primary=True, operation_id="o"),
    "BindPrimary": lambda c: c.bind_primary("lan", operation_id="o", mac="52:54:00:aa:00:02"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_a_lying_agent_is_a_clear_error_within_the_deadline(liar: LyingGuest, lie: str) -> None:
    method, reply, code = LIES[lie]
    liar.agent.replies[method] = reply
    with client_of(liar.channel, call_timeout=2.0) as client:
        error, took = fails(lambda: CALLS[method](client))
    assert error.code == code, error
    assert took < 2.0 + SLACK
    assert str(error).isprintable()


def test_an_agent_that_answers_after_the_deadline(liar: LyingGuest) -> None:
    liar.agent.sleep = 3.0
    with client_of(liar.channel, call_timeout=0.5) as client:
        error, took = fails(client.state)
    assert error.code == "DEADLINE_EXCEEDED" and took < 0.5 + SLACK


# -- per-domain isolation in the coordinator ----------------------------------------------


HANG_S = 2.0


def hangs_until_its_deadline(released: threading.Event) -> Callable[[str, float | None], None]:
    """A guest that never answers: the call ends at its deadline, as gRPC would end it."""

    def hook(_subject: str, timeout: float | None) -> None:
        released.wait(timeout)
        raise AgentError("DEADLINE_EXCEEDED", "Deadline Exceeded")

    return hook


def run_both(
    world: World, journal_path: Path, coordinator_for: Callable[[Journal], Coordinator]
) -> dict[str, tuple[MigrationReport | BaseException, float]]:
    """Migrate vm1 and vm2 from A to B at the same time; each one's result and seconds."""
    results: dict[str, tuple[MigrationReport | BaseException, float]] = {}
    started = time.monotonic()

    def run(name: str) -> None:
        with Journal(journal_path) as journal:
            try:
                report: MigrationReport | BaseException = coordinator_for(journal).migrate(
                    MigrationRequest(name, A, B)
                )
            except BaseException as exc:
                report = exc
            results[name] = (report, time.monotonic() - started)

    threads = [threading.Thread(target=run, args=(n,)) for n in ("vm1", "vm2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_S * 5)
    assert not any(t.is_alive() for t in threads)
    return results


def test_a_guest_that_hangs_its_switch_does_not_delay_another_domains_migration(
    journal_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("host.workflow.migration.SWITCH_TIMEOUT", HANG_S)
    world = World((VM1, VM2))
    released = threading.Event()
    world.agent_before[("vm1", "UseStandby")] = hangs_until_its_deadline(released)
    try:
        results = run_both(world, journal_path, world.coordinator)
    finally:
        released.set()

    vm2, vm2_s = results["vm2"]
    assert isinstance(vm2, MigrationReport) and vm2.outcome is Outcome.DONE
    assert vm2_s < HANG_S / 2, f"vm2 took {vm2_s:.2f} s next to a hung guest"
    vm1, vm1_s = results["vm1"]
    assert isinstance(vm1, MigrationReport), f"vm1 raised {vm1!r}"
    assert vm1.outcome is Outcome.ROLLED_BACK
    assert "DEADLINE_EXCEEDED" in (vm1.error or "")
    assert HANG_S <= vm1_s < HANG_S + SLACK
    assert world.running_on("vm1") == [A] and world.modes("vm1") == {
        "lan": "primary",
        "wan": "primary",
    }
    assert world.running_on("vm2") == [B] and world.modes("vm2") == {"lan": "primary"}
    with Journal(journal_path) as journal:
        assert journal.open_workflows() == []
        assert sorted(w.outcome or "" for w in journal.recent(2)) == ["done", "rolled-back"]
    assert world.agents_open == 0


def test_a_guest_that_never_answers_preflight_is_refused_and_others_go_on(
    journal_path: Path,
) -> None:
    world = World((VM1, VM2))
    released = threading.Event()
    world.agent_before[("vm1", "Check")] = hangs_until_its_deadline(released)

    def coordinator(journal: Journal) -> Coordinator:
        return Coordinator(
            journal,
            connect=world.connect,  # type: ignore[arg-type]
            agent_for=lambda dom, _t: world.agent_for(dom, HANG_S),
        )

    try:
        results = run_both(world, journal_path, coordinator)
    finally:
        released.set()

    vm2, vm2_s = results["vm2"]
    assert isinstance(vm2, MigrationReport) and vm2.outcome is Outcome.DONE
    assert vm2_s < HANG_S / 2
    vm1, vm1_s = results["vm1"]
    assert isinstance(vm1, PreflightError), f"vm1: {vm1!r}"
    assert "does not answer" in str(vm1) and "DEADLINE_EXCEEDED" in str(vm1)
    assert HANG_S <= vm1_s < HANG_S + SLACK
    assert world.running_on("vm1") == [A]
    with Journal(journal_path) as journal:
        assert journal.open_workflows() == []


# -- helpers for the handshake tests ---------------------------------------------------------


def _feed(sock: socket.socket, chunk: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.recv(wire.FRAME_SIZE)  # the HELLO
        while True:
            sock.sendall(chunk)


def _joined(thread: threading.Thread) -> bool:
    thread.join(1.0)
    return not thread.is_alive()
