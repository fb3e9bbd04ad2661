"""A TCP stream beside the pings: what a user's connection feels during a migration.

ICMP counts lost packets; a TCP connection instead stalls and retransmits.  The sender
(``python -m lab.traffic tcp-send``) writes to a sink in the guest at a steady rate from a
non-blocking socket, so a stall backs data up in its buffer instead of stopping the clock,
and samples the kernel's ``TCP_INFO`` for the connection every :data:`SAMPLE_S`: the bytes
the guest has acknowledged and the segments retransmitted so far.  The longest stall is
the longest time without a new acknowledgement while data was waiting for one.

Record, TSV like the echo sender's::

    #ptmig-tcp      1
    #target         192.168.77.10:5201
    #rate           1048576                bytes per second offered
    #start_ns       <epoch ns>
    i  T_NS  BYTES_ACKED  TOTAL_RETRANS  NOT_ACKED_BYTES
    #stop_ns        <epoch ns>
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from lab.traffic.analysis import Phase
from lab.traffic.sender import GRACE_S, SenderProcess

FORMAT = "#ptmig-tcp\t1"
SAMPLE_S = 0.005
CHUNK = 8192
#: struct tcp_info (include/uapi/linux/tcp.h): tcpi_total_retrans is the u32 at byte 100,
#: tcpi_bytes_acked the u64 at 120 (Linux >= 4.1); 136 bytes reach bytes_received.
_TCP_INFO_LEN = 136
_TOTAL_RETRANS = struct.Struct("@I")
_BYTES_ACKED = struct.Struct("@Q")

#: The guest's side: accept connections on PORT and discard what they send.  Python 3 is
#: in every lab guest (the agent runs on it); started detached from the console's shell.
SINK_PORT = 5201
SINK_SCRIPT = (
    "import socket,threading\n"
    "def drain(c):\n"
    "    while c.recv(65536): pass\n"
    "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
    f"s.bind(('0.0.0.0',{SINK_PORT})); s.listen(8)\n"
    "while True: threading.Thread(target=drain,args=(s.accept()[0],),daemon=True).start()\n"
)


def tcp_counters(sock: socket.socket) -> tuple[int, int]:
    """(bytes acknowledged by the peer, segments retransmitted) of a connected socket."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    if len(info) < _TCP_INFO_LEN:
        raise OSError(f"TCP_INFO gave {len(info)} bytes; this kernel predates tcpi_bytes_acked")
    (retrans,) = _TOTAL_RETRANS.unpack_from(info, 100)
    (acked,) = _BYTES_ACKED.unpack_from(info, 120)
    return acked, retrans


def tcp_send_main(target: str, port: int, outfile: str, rate: int) -> int:
    """Stream to *target*:*port* at *rate* bytes/s until SIGINT/SIGTERM, sampling TCP_INFO."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, not {rate}")
    stop = False

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    sock = socket.create_connection((target, port), timeout=10)
    sock.setblocking(False)
    payload = os.urandom(CHUNK)
    offered = 0
    with open(outfile, "w", encoding="ascii") as out:
        out.write(f"{FORMAT}\n#target\t{target}:{port}\n#rate\t{rate}\n")
        t0 = time.time_ns()
        out.write(f"#start_ns\t{t0}\n")
        out.flush()
        next_flush = time.monotonic() + 0.2
        while not stop:
            now_ns = time.time_ns()
            due = (now_ns - t0) * rate // 1_000_000_000
            while offered < due:
                try:
                    offered += sock.send(payload[: min(CHUNK, due - offered)])
                except BlockingIOError:
                    break  # the buffer is full: the connection is stalled or slow
            acked, retrans = tcp_counters(sock)
            out.write(f"i\t{now_ns}\t{acked}\t{retrans}\t{offered - acked}\n")
            if time.monotonic() >= next_flush:
                out.flush()
                next_flush = time.monotonic() + 0.2
            time.sleep(SAMPLE_S)
        out.write(f"#stop_ns\t{time.time_ns()}\n")
    sock.close()
    return 0


@dataclass(frozen=True)
class TcpSample:
    t_ns: int
    acked: int
    retrans: int
    outstanding: int


@dataclass(frozen=True)
class TcpReport:
    """One stream's view of a run."""

    longest_stall_ms: float
    #: The phase in which the longest stall began ("" outside every phase).
    stall_phase: str
    retransmits: int
    bytes_acked: int
    duration_s: float


def load_tcp_record(path: str | os.PathLike[str]) -> list[TcpSample]:
    lines = Path(path).read_text(encoding="ascii").splitlines()
    if not lines or lines[0] != FORMAT:
        raise ValueError(f"{path}: not a TCP stream record")
    samples = []
    for line in lines:
        if line.startswith("i\t"):
            _, t, acked, retrans, outstanding = line.split("\t")
            samples.append(TcpSample(int(t), int(acked), int(retrans), int(outstanding)))
    return samples


def analyze_tcp(samples: Sequence[TcpSample], phases: Sequence[Phase] = ()) -> TcpReport:
    """The longest interval between two acknowledgements during which bytes were waiting
    for one (an idle sender is not a stall), and the retransmits over the whole record."""
    if len(samples) < 2:
        raise ValueError("a TCP record needs at least two samples")
    longest_ns, stall_start = 0, samples[0].t_ns
    last = samples[0]  # the last sample that saw an acknowledgement, or nothing waiting
    for s in samples[1:]:
        if s.acked > last.acked:  # bytes were waiting since *last*: a gap, maybe a stall
            if s.t_ns - last.t_ns > longest_ns:
                longest_ns, stall_start = s.t_ns - last.t_ns, last.t_ns
            last = s
        elif s.outstanding == 0:  # idle: nothing waits for an acknowledgement
            last = s
    end = samples[-1]
    if end.outstanding > 0 and end.t_ns - last.t_ns > longest_ns:  # still stalled at the end
        longest_ns, stall_start = end.t_ns - last.t_ns, last.t_ns
    at = stall_start / 1e9
    phase = next((p.name for p in phases if p.start <= at < p.end), "")
    return TcpReport(
        longest_stall_ms=longest_ns / 1e6,
        stall_phase=phase,
        retransmits=samples[-1].retrans - samples[0].retrans,
        bytes_acked=samples[-1].acked - samples[0].acked,
        duration_s=(samples[-1].t_ns - samples[0].t_ns) / 1e9,
    )


class TcpStream(SenderProcess):
    """Runs ``python -m lab.traffic tcp-send`` as a child process."""

    def __init__(
        self,
        target: str,
        outfile: str | os.PathLike[str],
        *,
        port: int = SINK_PORT,
        rate: int = 1 << 20,
        prefix: Sequence[str] = (),
        python: str = sys.executable,
    ) -> None:
        super().__init__(outfile, prefix=prefix, python=python)
        self.target, self.port, self.rate = target, port, rate

    def arguments(self) -> list[str]:
        port, rate = str(self.port), str(self.rate)
        return ["tcp-send", self.target, str(self.outfile), "--port", port, "--rate", rate]

    def stop(self, phases: Sequence[Phase] = (), timeout: float = GRACE_S + 10.0) -> TcpReport:
        self._interrupt_and_wait(timeout)
        return analyze_tcp(load_tcp_record(self.outfile), phases)

    def __enter__(self) -> TcpStream:
        self.start()
        return self
