"""Fixed-rate ICMP echo sender and loss analysis for live-migration measurements.

Why: iputils ``ping -i 0.001`` drops to about 100 pps while replies are outstanding, so during an
outage it sends about 10x fewer requests and undercounts the loss. This sender keeps the schedule
(request n is due at t0 + n/rate) through an outage and catches up if the process falls behind.

Run as a process (root, raw socket)::

    python -m lab.traffic send TARGET_IP OUTFILE --rate 1000 [--payload-size 56] [--duration S]
    python -m lab.traffic analyze OUTFILE [--phases FILE] [--json]

The output file is TSV, one event per line, written in order and flushed every 0.2 s, so a killed
run still leaves usable data::

    #ptmig-traffic  1                    magic and format version
    #target         127.0.0.1
    #rate           1000
    #payload_size   56
    #token          0123456789abcdef     per-run random 64-bit token (hex), carried in every payload
    #ident          4660                 ICMP id of this run
    #start_ns       <epoch ns>           CLOCK_REALTIME at t0 (request 0 due)
    s  SEQ  SEND_NS  [ERRNO]             request SEQ sent (ERRNO: sendto failed; counts as lost)
    r  SEQ  RECV_NS                      reply to SEQ received (a later duplicate is ignored)
    #stop_ns        <epoch ns>           sending stopped (absent if the sender was killed)
    #end_ns         <epoch ns>           listening stopped, 1 s after #stop_ns (ditto)

All times are CLOCK_REALTIME ns (``time.time_ns``; reply times from the kernel's SO_TIMESTAMPNS
when available), so they can be matched against phase marks written by other processes.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import itertools
import json
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

FORMAT_MAGIC = "#ptmig-traffic"
FORMAT_VERSION = 1
GRACE_S = 1.0
"""How long the sender keeps listening after it stops sending; later replies count as lost."""
FLUSH_INTERVAL_NS = 200_000_000
MIN_PAYLOAD = 16  # token + sequence number
MAX_PAYLOAD = 65_000
OTHER_PHASE = "other"

_ICMP_ECHO_REQUEST = 8
_ICMP_ECHO_REPLY = 0
_ICMP6_ECHO_REQUEST = 128
_ICMP6_ECHO_REPLY = 129
# Linux constants that the socket module does not export.
_SOL_RAW = 255
_ICMP_FILTER = 1  # SOL_RAW option: bit mask of ICMP types to drop
_ICMP6_FILTER = 1  # IPPROTO_ICMPV6 option: 256-bit mask of ICMPv6 types to drop
_SO_TIMESTAMPNS = 35  # SO_TIMESTAMPNS_OLD on x86/arm; SCM_TIMESTAMPNS has the same value
_SO_RCVBUFFORCE = 33
_RCVBUF_BYTES = 8 << 20  # room for a whole catch-up burst of replies between two drains
_TIMESPEC = struct.Struct("@ll")
_ICMP_HEADER = struct.Struct("!BBHHH")
_PAYLOAD_HEAD = struct.Struct("!QQ")  # token, sequence number


# --------------------------------------------------------------------------------------------
# Scheduling (pure, so that it can be tested with a fake clock)


class RateSchedule:
    """Due time of request n, t0 + n/rate, computed exactly so that no drift accumulates."""

    def __init__(self, rate: float, t0_ns: int) -> None:
        if not rate > 0 or not rate < float("inf"):
            raise ValueError(f"rate must be positive and finite, not {rate!r}")
        frac = Fraction(rate).limit_denominator(1_000_000)
        if frac <= 0:
            raise ValueError(f"rate too small: {rate!r}")
        self.rate = rate
        self.t0_ns = t0_ns
        self._num = frac.numerator
        self._den = frac.denominator

    def due_ns(self, n: int) -> int:
        """Monotonic time at which request n is due."""
        return self.t0_ns + (n * 1_000_000_000 * self._den) // self._num


def run_schedule(
    schedule: RateSchedule,
    clock_ns: Callable[[], int],
    wait_ns: Callable[[int], None],
    send: Callable[[int], None],
    should_stop: Callable[[], bool],
    count: int | None = None,
    poll_every: int = 16,
) -> int:
    """Send requests 0, 1, ... at their due times; return how many were sent.

    If the clock is past the due time the request goes out at once (catch-up); the schedule never
    moves, so a stall or an outage does not lower the rate. ``wait_ns(d)`` may return early (it
    also handles replies); ``wait_ns(0)`` every ``poll_every`` catch-up sends drains replies.
    """
    n = 0
    while (count is None or n < count) and not should_stop():
        now = clock_ns()
        due = schedule.due_ns(n)
        if now < due:
            wait_ns(due - now)
            continue
        send(n)
        n += 1
        if poll_every > 0 and n % poll_every == 0 and clock_ns() >= schedule.due_ns(n):
            wait_ns(0)
    return n


# --------------------------------------------------------------------------------------------
# Packets


def icmp_checksum(data: bytes) -> int:
    """RFC 1071 checksum (ICMPv4 only; the kernel fills it in for ICMPv6)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def build_request(seq: int, ident: int, token: int, payload_size: int, v6: bool = False) -> bytes:
    """Echo request whose payload starts with (token, 64-bit seq); the ICMP seq is seq mod 2^16."""
    payload = _PAYLOAD_HEAD.pack(token, seq) + bytes(payload_size - MIN_PAYLOAD)
    typ = _ICMP6_ECHO_REQUEST if v6 else _ICMP_ECHO_REQUEST
    header = _ICMP_HEADER.pack(typ, 0, 0, ident, seq & 0xFFFF)
    if v6:
        return header + payload
    csum = icmp_checksum(header + payload)
    return _ICMP_HEADER.pack(typ, 0, csum, ident, seq & 0xFFFF) + payload


def parse_reply(packet: bytes, ident: int, token: int, v6: bool = False) -> int | None:
    """Sequence number of an echo reply of this run, or None for anything else.

    IPv4 raw sockets deliver the IP header too; IPv6 raw sockets do not.
    """
    if not v6:
        if len(packet) < 20:
            return None
        packet = packet[(packet[0] & 0x0F) * 4 :]
    if len(packet) < _ICMP_HEADER.size + _PAYLOAD_HEAD.size:
        return None
    typ, code, _csum, rid, _rseq = _ICMP_HEADER.unpack_from(packet)
    if typ != (_ICMP6_ECHO_REPLY if v6 else _ICMP_ECHO_REPLY) or code != 0 or rid != ident:
        return None
    rtoken, seq = _PAYLOAD_HEAD.unpack_from(packet, _ICMP_HEADER.size)
    return int(seq) if rtoken == token else None


# --------------------------------------------------------------------------------------------
# Output file


class _RecordWriter:
    """Appends events to the TSV file and flushes periodically, so a killed run keeps its data."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._f: IO[str] = open(path, "w", encoding="ascii", buffering=1 << 16)  # noqa: SIM115
        self._last_flush = time.monotonic_ns()

    def header(self, key: str, value: object) -> None:
        self._f.write(f"#{key}\t{value}\n")

    def sent(self, seq: int, send_ns: int, err: int | None) -> None:
        self._f.write(f"s\t{seq}\t{send_ns}\n" if err is None else f"s\t{seq}\t{send_ns}\t{err}\n")

    def received(self, seq: int, recv_ns: int) -> None:
        self._f.write(f"r\t{seq}\t{recv_ns}\n")

    def maybe_flush(self, now_ns: int) -> None:
        if now_ns - self._last_flush >= FLUSH_INTERVAL_NS:
            self.flush(now_ns)

    def flush(self, now_ns: int | None = None) -> None:
        self._f.flush()
        self._last_flush = time.monotonic_ns() if now_ns is None else now_ns

    def close(self) -> None:
        self._f.close()


@dataclass
class PingRecord:
    """One sender run: per request (index = seq) its send time and reply time or None."""

    target: str
    rate: float
    payload_size: int
    token: int
    ident: int
    start_ns: int
    send_ns: list[int]
    recv_ns: list[int | None]
    send_errors: dict[int, int] = field(default_factory=dict)  # seq -> errno of sendto
    duplicates: int = 0
    stop_ns: int | None = None
    end_ns: int | None = None

    @property
    def complete(self) -> bool:
        """False if the sender was killed before it finished listening for late replies."""
        return self.end_ns is not None

    @property
    def sent(self) -> int:
        return len(self.send_ns)


def load_record(path: str | os.PathLike[str]) -> PingRecord:
    """Read a sender output file; a torn last line (killed mid-write) is ignored."""
    headers: dict[str, str] = {}
    send: list[int] = []
    recv: list[int | None] = []
    errors: dict[int, int] = {}
    duplicates = 0
    lines = Path(path).read_text(encoding="ascii").split("\n")
    # The text after the last newline is a torn or empty line: drop it.
    for lineno, line in enumerate(lines[:-1], 1):
        parts = line.split("\t")
        try:
            if parts[0].startswith("#"):
                headers[parts[0][1:]] = parts[1]
            elif parts[0] == "s":
                seq, t = int(parts[1]), int(parts[2])
                if seq != len(send):
                    raise ValueError(f"send of seq {seq} out of order")
                send.append(t)
                recv.append(None)
                if len(parts) > 3:
                    errors[seq] = int(parts[3])
            elif parts[0] == "r":
                seq, t = int(parts[1]), int(parts[2])
                if not 0 <= seq < len(recv):
                    raise ValueError(f"reply to unsent seq {seq}")
                if recv[seq] is None:
                    recv[seq] = t
                else:
                    duplicates += 1
            else:
                raise ValueError(f"unknown record {parts[0]!r}")
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: bad line {line!r}: {exc}") from exc
    if headers.get(FORMAT_MAGIC[1:]) != str(FORMAT_VERSION):
        raise ValueError(f"{path}: not a ptmig-traffic v{FORMAT_VERSION} file")
    stop = headers.get("stop_ns")
    end = headers.get("end_ns")
    return PingRecord(
        target=headers["target"],
        rate=float(headers["rate"]),
        payload_size=int(headers["payload_size"]),
        token=int(headers["token"], 16),
        ident=int(headers["ident"]),
        start_ns=int(headers["start_ns"]),
        send_ns=send,
        recv_ns=recv,
        send_errors=errors,
        duplicates=duplicates,
        stop_ns=None if stop is None else int(stop),
        end_ns=None if end is None else int(end),
    )


# --------------------------------------------------------------------------------------------
# The sender process


def _open_socket(v6: bool) -> socket.socket:
    """Raw ICMP socket that only receives echo replies, with kernel receive timestamps."""
    if v6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        # struct icmp6_filter: 8 native u32 words; a set bit (type & 31) of word type >> 5 blocks.
        words = [0xFFFFFFFF] * 8
        words[_ICMP6_ECHO_REPLY >> 5] &= ~(1 << (_ICMP6_ECHO_REPLY & 31)) & 0xFFFFFFFF
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, struct.pack("@8I", *words))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        with contextlib.suppress(OSError):
            allowed = 1 << _ICMP_ECHO_REPLY
            sock.setsockopt(_SOL_RAW, _ICMP_FILTER, struct.pack("@I", ~allowed & 0xFFFFFFFF))
    for opt in (_SO_RCVBUFFORCE, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, _RCVBUF_BYTES)
            break
        except OSError:
            continue
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    sock.setblocking(False)
    return sock


def _kernel_time_ns(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, typ, data in ancdata:
        if level == socket.SOL_SOCKET and typ == _SO_TIMESTAMPNS and len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            return int(sec) * 1_000_000_000 + int(nsec)
    return None


def send_main(
    target: str,
    outfile: str | os.PathLike[str],
    rate: float = 1000.0,
    payload_size: int = 56,
    duration: float | None = None,
) -> int:
    """Run the sender until SIGINT/SIGTERM or ``duration``; then listen 1 s more. Returns 0."""
    if not MIN_PAYLOAD <= payload_size <= MAX_PAYLOAD:
        raise ValueError(f"payload size must be {MIN_PAYLOAD}..{MAX_PAYLOAD}")
    addr = ipaddress.ip_address(target)
    v6 = addr.version == 6
    sockaddr: tuple[Any, ...] = (str(addr), 0, 0, 0) if v6 else (str(addr), 0)
    RateSchedule(rate, 0)  # raises on a bad rate before anything is opened
    count = None if duration is None else round(duration * rate)

    stop_requested = False

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    token = secrets.randbits(64)
    ident = token & 0xFFFF  # stable for the run, and random across runs
    sock = _open_socket(v6)
    writer = _RecordWriter(outfile)
    sent = 0

    def drain() -> None:
        while True:
            try:
                data, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(_TIMESPEC.size))
            except (BlockingIOError, InterruptedError):
                return
            recv_ns = _kernel_time_ns(anc) or time.time_ns()
            seq = parse_reply(data, ident, token, v6)
            if seq is not None and seq < sent:
                writer.received(seq, recv_ns)

    def wait_ns(timeout_ns: int) -> None:
        timeout = min(timeout_ns, 100_000_000) / 1e9
        readable, _, _ = select.select([sock], [], [], timeout)
        if readable:
            drain()
        writer.maybe_flush(time.monotonic_ns())

    def send(seq: int) -> None:
        nonlocal sent
        packet = build_request(seq, ident, token, payload_size, v6)
        send_ns = time.time_ns()
        err: int | None = None
        try:
            sock.sendto(packet, sockaddr)
        except OSError as exc:  # e.g. EHOSTUNREACH, ENOBUFS: the request is lost, keep the rate
            err = exc.errno or -1
        sent = seq + 1
        writer.sent(seq, send_ns, err)

    try:
        writer.header(FORMAT_MAGIC[1:], FORMAT_VERSION)
        writer.header("target", addr)
        writer.header("rate", rate)
        writer.header("payload_size", payload_size)
        writer.header("token", f"{token:016x}")
        writer.header("ident", ident)
        t0 = time.monotonic_ns()
        writer.header("start_ns", time.time_ns())
        writer.flush()
        run_schedule(
            RateSchedule(rate, t0),
            time.monotonic_ns,
            wait_ns,
            send,
            lambda: stop_requested,
            count,
        )
        writer.header("stop_ns", time.time_ns())
        deadline = time.monotonic_ns() + int(GRACE_S * 1e9)
        while (left := deadline - time.monotonic_ns()) > 0:
            wait_ns(left)
        drain()
        writer.header("end_ns", time.time_ns())
    finally:
        writer.close()
        sock.close()
    return 0


# --------------------------------------------------------------------------------------------
# Driving the sender from Python


class FixedRatePinger:
    """Runs the sender as a child process, e.g. under ``ip netns exec labcl``.

    Control is by PID only: ``ip netns exec`` execs the command, so the child's PID is the
    sender's; with a prefix that forks (sudo), it must relay SIGINT.
    """

    def __init__(
        self,
        target: str,
        outfile: str | os.PathLike[str],
        *,
        rate: float = 1000.0,
        prefix: Sequence[str] = (),
        payload_size: int = 56,
        duration: float | None = None,
        python: str = sys.executable,
        ready_timeout: float = 10.0,
    ) -> None:
        self.target = target
        self.outfile = Path(outfile)
        self.rate = rate
        self.prefix = list(prefix)
        self.payload_size = payload_size
        self.duration = duration
        self.python = python
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._killed = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def command(self) -> list[str]:
        cmd = [*self.prefix, self.python, "-m", "lab.traffic", "send", self.target]
        cmd += [str(self.outfile), "--rate", str(self.rate)]
        cmd += ["--payload-size", str(self.payload_size)]
        if self.duration is not None:
            cmd += ["--duration", str(self.duration)]
        return cmd

    def start(self) -> None:
        """Start the sender and return once it has written its start time (t0)."""
        if self._proc is not None:
            raise RuntimeError("already started")
        # A stale file would look ready before the new sender truncates it.
        self.outfile.unlink(missing_ok=True)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the child)
        self._proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            env=env,
        )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._started():
                return
            if self._proc.poll() is not None:
                raise RuntimeError(f"sender exited with {self._proc.returncode}: {self._err()}")
            time.sleep(0.01)
        self._kill()
        raise RuntimeError(f"sender not ready after {self.ready_timeout} s: {self._err()}")

    def _started(self) -> bool:
        try:
            with self.outfile.open(encoding="ascii") as f:
                return any(line.startswith("#start_ns\t") for line in f)
        except FileNotFoundError:
            return False

    def _err(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace").strip()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()  # by PID (Popen keeps it and never signals a reaped child)
            self._killed = True
            self._proc.wait()

    def stop(self, timeout: float = GRACE_S + 10.0) -> PingRecord:
        """SIGINT the sender, let it listen 1 s for late replies, and load its record."""
        if self._proc is None:
            raise RuntimeError("not started")
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def wait(self, timeout: float | None = None) -> PingRecord:
        """Wait for the sender to exit (``duration`` runs), then load its record.

        On timeout the sender is killed and the incomplete record is returned.
        """
        if self._proc is None:
            raise RuntimeError("not started")
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        rc = self._proc.returncode
        if rc != 0 and not self._killed:
            raise RuntimeError(f"sender exited with {rc}: {self._err()}")
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        return load_record(self.outfile)

    def __enter__(self) -> FixedRatePinger:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(GRACE_S + 10.0)
            except subprocess.TimeoutExpired:
                self._kill()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


# --------------------------------------------------------------------------------------------
# Analysis


@dataclass(frozen=True)
class Phase:
    """A named interval of a test run, in epoch seconds (as the lab scripts write them)."""

    name: str
    start: float
    end: float


def load_phases(path: str | os.PathLike[str]) -> list[Phase]:
    """Read ``name start end`` lines (epoch seconds); blank lines and ``#`` comments are skipped."""
    phases = []
    for line in Path(path).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, start, end = line.split()
            phases.append(Phase(name, float(start), float(end)))
    return phases


@dataclass(frozen=True)
class Outage:
    """A run of consecutive lost requests ``first_seq..last_seq``.

    Its duration is the time between the send times of the answered requests on either side;
    at the edge of the record (no answered neighbour) one nominal period stands in for it, so one
    lost request anywhere counts as two periods.
    """

    first_seq: int
    last_seq: int
    lost: int
    start_ns: int
    end_ns: int
    phase: str

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "duration_ms": self.duration_ns / 1e6}


@dataclass
class PhaseStats:
    """Loss of the requests SENT in one phase (``other``: sent outside all phases)."""

    name: str
    start: float | None
    end: float | None
    sent: int = 0
    received: int = 0
    lost: int = 0
    undetermined: int = 0
    outages: int = 0
    longest_outage: Outage | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["longest_outage"] = _outage_dict(self.longest_outage)
        d["longest_outage_ms"] = _outage_ms(self.longest_outage)
        return d


def _outage_dict(o: Outage | None) -> dict[str, Any] | None:
    return None if o is None else o.to_dict()


def _outage_ms(o: Outage | None) -> float:
    return 0.0 if o is None else o.duration_ns / 1e6


@dataclass
class TrafficReport:
    """Loss summary of one run; ``lost`` = no reply by the end of sending + 1 s."""

    target: str
    rate_requested: float
    rate_measured: float | None
    sent: int
    received: int
    lost: int
    undetermined: int  # unanswered, sent < 1 s before a killed run's last event
    send_errors: int
    duplicates: int
    complete: bool
    first_send_ns: int | None
    last_send_ns: int | None
    longest_outage: Outage | None
    longest_reply_gap_ns: int | None
    phases: list[PhaseStats]
    outages: list[Outage]

    @property
    def loss_ratio(self) -> float:
        judged = self.received + self.lost
        return self.lost / judged if judged else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (times in epoch ns, durations also in ms)."""
        return {
            "target": self.target,
            "rate_requested": self.rate_requested,
            "rate_measured": self.rate_measured,
            "sent": self.sent,
            "received": self.received,
            "lost": self.lost,
            "loss_ratio": self.loss_ratio,
            "undetermined": self.undetermined,
            "send_errors": self.send_errors,
            "duplicates": self.duplicates,
            "complete": self.complete,
            "first_send_ns": self.first_send_ns,
            "last_send_ns": self.last_send_ns,
            "longest_outage": _outage_dict(self.longest_outage),
            "longest_outage_ms": _outage_ms(self.longest_outage),
            "longest_reply_gap_ns": self.longest_reply_gap_ns,
            "longest_reply_gap_ms": (
                None if self.longest_reply_gap_ns is None else self.longest_reply_gap_ns / 1e6
            ),
            "phases": [p.to_dict() for p in self.phases],
            "outages": [o.to_dict() for o in self.outages],
        }

    def format_table(self) -> str:
        """A few lines for a terminal or a log."""
        rate = "-" if self.rate_measured is None else f"{self.rate_measured:.1f}"
        gap = "-" if self.longest_reply_gap_ns is None else f"{self.longest_reply_gap_ns / 1e6:.1f}"
        lo = self.longest_outage
        lines = [
            f"{self.target}: sent {self.sent}, received {self.received}, lost {self.lost} "
            f"({100 * self.loss_ratio:.3f}%), rate {rate}/{self.rate_requested:g} pps",
            f"longest outage {_outage_ms(lo):.1f} ms ({0 if lo is None else lo.lost} lost), "
            f"{len(self.outages)} outages, longest reply gap {gap} ms",
        ]
        notes = []
        if not self.complete:
            notes.append(f"incomplete run, {self.undetermined} undetermined")
        if self.send_errors:
            notes.append(f"{self.send_errors} send errors")
        if self.duplicates:
            notes.append(f"{self.duplicates} duplicate replies")
        if notes:
            lines.append("; ".join(notes))
        if self.phases:
            width = max(12, *(len(p.name) for p in self.phases))
            lines.append(
                f"{'phase':<{width}} {'sent':>7} {'lost':>6} {'outage_ms':>10} {'outages':>7}"
            )
            for p in self.phases:
                lines.append(
                    f"{p.name:<{width}} {p.sent:>7} {p.lost:>6} "
                    f"{_outage_ms(p.longest_outage):>10.1f} {p.outages:>7}"
                )
        return "\n".join(lines)


_ANSWERED, _LOST, _UNKNOWN = 0, 1, 2


def analyze(record: PingRecord, phases: Iterable[Phase] | None = None) -> TrafficReport:
    """Count losses, per phase and overall, and find outages.

    A request belongs to the first phase whose [start, end) holds its send time; an outage
    belongs to the phase in which its first lost request was sent. If the run was killed,
    unanswered requests sent less than 1 s before the last recorded event are undetermined,
    neither lost nor received.
    """
    phase_list = list(phases) if phases is not None else None
    if phase_list is not None and any(p.name == OTHER_PHASE for p in phase_list):
        raise ValueError(f"phase name {OTHER_PHASE!r} is reserved")
    n = record.sent
    send = record.send_ns
    recv = record.recv_ns
    period_ns = round(1e9 / record.rate)

    cutoff: int | None = None
    if not record.complete:
        events = [t for t in (*send, *recv) if t is not None]
        cutoff = (max(events) if events else record.start_ns) - int(GRACE_S * 1e9)
    status = [
        _ANSWERED if r is not None else _UNKNOWN if cutoff is not None and s > cutoff else _LOST
        for s, r in zip(send, recv, strict=True)
    ]

    # Phase of each request (index into stats; the last one is "other").
    bounds = [(round(p.start * 1e9), round(p.end * 1e9)) for p in phase_list or []]
    stats = [PhaseStats(p.name, p.start, p.end) for p in phase_list or []]
    stats.append(PhaseStats(OTHER_PHASE, None, None))
    other = len(stats) - 1

    def phase_of(t: int) -> int:
        for i, (a, b) in enumerate(bounds):
            if a <= t < b:
                return i
        return other

    owner = [phase_of(t) for t in send]
    for i in range(n):
        st = stats[owner[i]]
        st.sent += 1
        if status[i] == _ANSWERED:
            st.received += 1
        elif status[i] == _LOST:
            st.lost += 1
        else:
            st.undetermined += 1

    outages: list[Outage] = []
    i = 0
    while i < n:
        if status[i] != _LOST:
            i += 1
            continue
        j = i
        while j + 1 < n and status[j + 1] == _LOST:
            j += 1
        start = send[i - 1] if i > 0 and status[i - 1] == _ANSWERED else send[i] - period_ns
        end = send[j + 1] if j + 1 < n and status[j + 1] == _ANSWERED else send[j] + period_ns
        outage = Outage(i, j, j - i + 1, start, end, stats[owner[i]].name)
        outages.append(outage)
        st = stats[owner[i]]
        st.outages += 1
        if st.longest_outage is None or outage.duration_ns > st.longest_outage.duration_ns:
            st.longest_outage = outage
        i = j + 1

    arrivals = sorted(r for r in recv if r is not None)
    gap = max((b - a for a, b in itertools.pairwise(arrivals)), default=None)
    rate = (n - 1) * 1e9 / (send[-1] - send[0]) if n >= 2 and send[-1] > send[0] else None
    return TrafficReport(
        target=record.target,
        rate_requested=record.rate,
        rate_measured=rate,
        sent=n,
        received=status.count(_ANSWERED),
        lost=status.count(_LOST),
        undetermined=status.count(_UNKNOWN),
        send_errors=len(record.send_errors),
        duplicates=record.duplicates,
        complete=record.complete,
        first_send_ns=send[0] if n else None,
        last_send_ns=send[-1] if n else None,
        longest_outage=max(outages, key=lambda o: o.duration_ns, default=None),
        longest_reply_gap_ns=gap,
        phases=stats if phase_list is not None else [],
        outages=outages,
    )


# --------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lab.traffic", description="Fixed-rate ICMP echo sender and loss analysis."
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_send = sub.add_parser("send", help="send echo requests at a fixed rate (root)")
    p_send.add_argument("target")
    p_send.add_argument("outfile")
    p_send.add_argument("--rate", type=float, default=1000.0, help="requests per second")
    p_send.add_argument("--payload-size", type=int, default=56, help="ICMP payload bytes (>= 16)")
    p_send.add_argument(
        "--duration", type=float, default=None, help="seconds (default: until a signal)"
    )
    p_an = sub.add_parser("analyze", help="summarize a sender output file")
    p_an.add_argument("outfile")
    p_an.add_argument("--phases", default=None, help="file of 'name start end' lines (epoch s)")
    p_an.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.cmd == "send":
        try:
            return send_main(args.target, args.outfile, args.rate, args.payload_size, args.duration)
        except (ValueError, PermissionError) as exc:
            print(f"lab.traffic send: {exc}", file=sys.stderr)
            return 1
    report = analyze(load_record(args.outfile), load_phases(args.phases) if args.phases else None)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
