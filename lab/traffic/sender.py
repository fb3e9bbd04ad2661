"""The fixed-rate sender: its schedule (pure, tested on a fake clock), the sender
process (``python -m lab.traffic send``) and :class:`FixedRatePinger`, which runs it.
"""

from __future__ import annotations

import contextlib
import ipaddress
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
from collections.abc import Callable, Sequence
from fractions import Fraction
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from lab.traffic.codec import (
    ICMP6_ECHO_REPLY,
    ICMP_ECHO_REPLY,
    MIN_PAYLOAD,
    build_request,
    parse_reply,
)
from lab.traffic.record import FORMAT_MAGIC, FORMAT_VERSION, PingRecord, RecordWriter, load_record

GRACE_S = 1.0
"""How long the sender keeps listening after it stops sending; later replies count as lost."""
MAX_PAYLOAD = 65_000
# Linux constants that the socket module does not export.
_SOL_RAW = 255
_ICMP_FILTER = 1  # SOL_RAW option: bit mask of ICMP types to drop
_ICMP6_FILTER = 1  # IPPROTO_ICMPV6 option: 256-bit mask of ICMPv6 types to drop
_SO_TIMESTAMPNS = 35  # SO_TIMESTAMPNS_OLD on x86/arm; SCM_TIMESTAMPNS has the same value
_SO_RCVBUFFORCE = 33
_RCVBUF_BYTES = 8 << 20  # room for a whole catch-up burst of replies between two drains
_TIMESPEC = struct.Struct("@ll")


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


def _open_socket(v6: bool) -> socket.socket:
    """Raw ICMP socket that only receives echo replies, with kernel receive timestamps."""
    if v6:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
        # struct icmp6_filter: 8 native u32 words; a set bit (type & 31) of word type >> 5 blocks.
        words = [0xFFFFFFFF] * 8
        words[ICMP6_ECHO_REPLY >> 5] &= ~(1 << (ICMP6_ECHO_REPLY & 31)) & 0xFFFFFFFF
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_ICMPV6, _ICMP6_FILTER, struct.pack("@8I", *words))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        with contextlib.suppress(OSError):
            allowed = 1 << ICMP_ECHO_REPLY
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
    writer = RecordWriter(outfile)
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


class SenderProcess:
    """A sender run as a child process, e.g. under ``ip netns exec labcl``, which writes its
    record to *outfile* and announces its start there (see :meth:`_started`).

    Control is by PID only: ``ip netns exec`` execs the command, so the child's PID is the
    sender's; with a prefix that forks (sudo), it must relay SIGINT.
    """

    #: The line that says the sender has started.
    START_MARK = "#start_ns\t"

    def __init__(
        self,
        outfile: str | os.PathLike[str],
        *,
        prefix: Sequence[str] = (),
        python: str = sys.executable,
        ready_timeout: float = 10.0,
    ) -> None:
        self.outfile = Path(outfile)
        self.prefix = list(prefix)
        self.python = python
        self.ready_timeout = ready_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self._killed = False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def arguments(self) -> list[str]:
        """``python -m lab.traffic`` arguments."""
        raise NotImplementedError

    def command(self) -> list[str]:
        return [*self.prefix, self.python, "-m", "lab.traffic", *self.arguments()]

    def start(self) -> None:
        """Start the sender and return once it has written its start time (t0)."""
        if self._proc is not None:
            raise RuntimeError("already started")
        # A stale file would look ready before the new sender truncates it.
        self.outfile.unlink(missing_ok=True)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent.parent)
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
                return any(line.startswith(self.START_MARK) for line in f)
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

    def _interrupt_and_wait(self, timeout: float | None) -> None:
        """SIGINT the sender (if it runs) and wait for it; on timeout it is killed."""
        if self._proc is None:
            raise RuntimeError("not started")
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        self._wait(timeout)

    def _wait(self, timeout: float | None) -> None:
        if self._proc is None:
            raise RuntimeError("not started")
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        rc = self._proc.returncode
        if rc != 0 and not self._killed:
            raise RuntimeError(f"sender exited with {rc}: {self._err()}")
        self._close()

    def _close(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None

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
        self._close()


class FixedRatePinger(SenderProcess):
    """Runs the echo sender (``python -m lab.traffic send``) as a child process."""

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
        super().__init__(outfile, prefix=prefix, python=python, ready_timeout=ready_timeout)
        self.target = target
        self.rate = rate
        self.payload_size = payload_size
        self.duration = duration

    def arguments(self) -> list[str]:
        args = ["send", self.target, str(self.outfile), "--rate", str(self.rate)]
        args += ["--payload-size", str(self.payload_size)]
        if self.duration is not None:
            args += ["--duration", str(self.duration)]
        return args

    def stop(self, timeout: float = GRACE_S + 10.0) -> PingRecord:
        """SIGINT the sender, let it listen 1 s for late replies, and load its record."""
        self._interrupt_and_wait(timeout)
        return load_record(self.outfile)

    def wait(self, timeout: float | None = None) -> PingRecord:
        """Wait for the sender to exit (``duration`` runs), then load its record.

        On timeout the sender is killed and the incomplete record is returned.
        """
        self._wait(timeout)
        return load_record(self.outfile)

    def __enter__(self) -> FixedRatePinger:
        self.start()
        return self
