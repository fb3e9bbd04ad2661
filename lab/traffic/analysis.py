"""Loss per phase and outages, from a sender's record."""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab.traffic.record import PingRecord
from lab.traffic.sender import GRACE_S

OTHER_PHASE = "other"


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


def _status(record: PingRecord) -> list[int]:
    """Each request answered, lost, or (a killed run's last second) undetermined."""
    cutoff: int | None = None
    if not record.complete:
        events = [t for t in (*record.send_ns, *record.recv_ns) if t is not None]
        cutoff = (max(events) if events else record.start_ns) - int(GRACE_S * 1e9)
    return [
        _ANSWERED if r is not None else _UNKNOWN if cutoff is not None and s > cutoff else _LOST
        for s, r in zip(record.send_ns, record.recv_ns, strict=True)
    ]


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
    status = _status(record)

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


#: The users' pinger: one echo request every 100 ms (``ping -i 0.1``), as OpenShift
#: Virtualization's QE measures a live migration's connectivity gap.
USER_PING_INTERVAL_S = 0.1


@dataclass(frozen=True)
class Gap:
    """A loss as a user's pinger sees it: the stretch with no echo reply around it, from
    the last reply that arrived before the first lost request was sent to the first that
    arrived after (arrival times: a reply held up by the VM's stop-and-copy and let out
    with the others when it resumes ends the gap, it does not start it).

    At the start of the record (no reply before) the gap opens at the first request's
    send time (``open_start``); at its end (no reply after) it closes at the last
    request's send time (``open_end``): either way the gap was at least that long.
    """

    first_seq: int  # the first and last lost request in it, as seqs of the full record
    last_seq: int
    lost: int  # the user's requests lost in it
    start_ns: int
    end_ns: int
    open_start: bool = False
    open_end: bool = False

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "duration_ms": self.duration_ns / 1e6}


def user_stride(rate: float, interval_s: float = USER_PING_INTERVAL_S) -> int:
    """Every how many requests of a *rate* record a pinger every *interval_s* would send;
    ValueError unless the interval is a whole number of the record's periods."""
    stride = round(rate * interval_s)
    if stride < 1 or abs(stride - rate * interval_s) > 1e-6 * stride:
        raise ValueError(f"{interval_s} s is not a whole number of periods at {rate} requests/s")
    return stride


def connectivity_gaps(
    record: PingRecord, interval_s: float = USER_PING_INTERVAL_S, offset: int = 0
) -> list[Gap]:
    """The gaps a pinger every *interval_s* would have seen, from a faster record: its
    requests *offset*, *offset* + k, ... (k = :func:`user_stride`), whose fates are the
    ones a ``ping -i 0.1`` beside the fast sender met.  Undetermined requests (a killed
    run's last second) end the series.  Losses inside one stretch without replies make
    one gap."""
    stride = user_stride(record.rate, interval_s)
    status = _status(record)
    seqs = [i for i in range(offset, record.sent, stride) if status[i] != _UNKNOWN]
    arrivals = sorted(r for i in seqs if (r := record.recv_ns[i]) is not None)
    gaps: list[Gap] = []
    for i in seqs:
        if status[i] != _LOST:
            continue
        sent = record.send_ns[i]
        k = bisect.bisect_left(arrivals, sent)
        start = arrivals[k - 1] if k else record.send_ns[seqs[0]]
        end = arrivals[k] if k < len(arrivals) else max(start, record.send_ns[seqs[-1]])
        if gaps and gaps[-1].start_ns == start and gaps[-1].end_ns == end:
            gaps[-1] = dataclasses.replace(gaps[-1], last_seq=i, lost=gaps[-1].lost + 1)
        else:
            gaps.append(Gap(i, i, 1, start, end, not k, k == len(arrivals)))
    return gaps
