"""The client's traffic to the guest's teams around a move, measured one way for the demo,
the migration benchmark and the soak: a fixed-rate sender per team (and a TCP stream to
team lan), started before and stopped after, each loss put into the move's phases."""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from lab import GUEST_IP, WAN_GUEST_IP
from lab.fabric import CLIENT_NS
from lab.paths import run_dir
from lab.run import CommandError, run
from lab.traffic import FixedRatePinger, Phase, PingRecord, analyze
from lab.traffic.tcp import TcpReport, TcpStream
from lab.vmlab import LabError, VmLab

RATE = 1000.0
SETTLE_S = 1.5
TEAMS = {"lan": GUEST_IP, "wan": WAN_GUEST_IP}


def wait_reachable(ip: str, timeout: float = 60.0) -> None:
    """The guest's address answers the client (networkd configures it after login)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            run(["ip", "netns", "exec", CLIENT_NS, "ping", "-c", "1", "-W", "1", ip])
            return
        except CommandError:
            time.sleep(0.5)
    raise LabError(f"the client cannot reach the guest at {ip}")


@dataclass
class Sample:
    """One migration of one case: phases, and per team the loss in each."""

    case: str
    route: str
    phases: list[Phase]
    lost: dict[str, dict[str, int]]  # team -> phase -> lost
    longest_ms: dict[str, dict[str, float]]  # team -> phase -> longest outage
    wall_s: float
    back_on_primary_s: float | None = None
    downtime_ms: int | None = None
    tcp: TcpReport | None = None
    #: The agent's log lines of the migration, (host epoch s, message), beside the phases.
    agent_log: list[tuple[float, str]] = field(default_factory=list)
    records: dict[str, PingRecord] = field(default_factory=dict, repr=False)

    def phase_seconds(self, name: str) -> float | None:
        return next((p.end - p.start for p in self.phases if p.name == name), None)

    def total_lost(self, team: str) -> int:
        return sum(v for k, v in self.lost[team].items())

    def lost_with_totals(self) -> dict[str, dict[str, int]]:
        """Per team, the loss in each phase and its ``total``."""
        return {team: lost | {"total": self.total_lost(team)} for team, lost in self.lost.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "route": self.route,
            "wall_s": self.wall_s,
            "downtime_ms": self.downtime_ms,
            "back_on_primary_s": self.back_on_primary_s,
            "phases": [{"name": p.name, "start": p.start, "end": p.end} for p in self.phases],
            "lost": self.lost,
            "longest_outage_ms": self.longest_ms,
            "total_lost": {t: self.total_lost(t) for t in self.lost},
            "tcp": asdict(self.tcp) if self.tcp else None,
            "agent_log": self.agent_log,
        }


def pingers(
    name: str, rate: float = RATE, teams: tuple[str, ...] = tuple(TEAMS)
) -> dict[str, FixedRatePinger]:
    """A sender per team from the client, each writing run_dir()/NAME-TEAM.ping."""
    return {
        team: FixedRatePinger(
            TEAMS[team],
            run_dir() / f"{name}-{team}.ping",
            rate=rate,
            prefix=["ip", "netns", "exec", CLIENT_NS],
        )
        for team in teams
    }


class Recorder:
    """Pingers (and, with *tcp*, the TCP stream to team lan, whose sink the guest must
    run) around a migration, with phase marks; files named after *name*."""

    def __init__(self, name: str, teams: tuple[str, ...] = tuple(TEAMS), tcp: bool = True):
        self.pingers = pingers(name, teams=teams)
        self.tcp = (
            TcpStream(
                TEAMS["lan"], run_dir() / f"{name}.tcp", prefix=["ip", "netns", "exec", CLIENT_NS]
            )
            if tcp
            else None
        )
        self.phases: list[Phase] = []

    def __enter__(self) -> Recorder:
        for p in self.pingers.values():
            p.start()
        if self.tcp is not None:
            self.tcp.start()
        time.sleep(SETTLE_S)
        return self

    def phase(self, name: str, start: float, end: float) -> None:
        self.phases.append(Phase(name, start, end))

    def finish(self, case: str, route: str, wall_s: float, **extra: Any) -> Sample:
        time.sleep(SETTLE_S)
        lost: dict[str, dict[str, int]] = {}
        longest: dict[str, dict[str, float]] = {}
        records = {}
        for team, pinger in self.pingers.items():
            record = pinger.stop()
            records[team] = record
            report = analyze(record, self.phases)
            lost[team] = {p.name: p.lost for p in report.phases}
            longest[team] = {
                p.name: (p.longest_outage.duration_ns / 1e6 if p.longest_outage else 0.0)
                for p in report.phases
            }
        tcp = self.tcp.stop(self.phases) if self.tcp is not None else None
        return Sample(
            case, route, self.phases, lost, longest, wall_s, tcp=tcp, records=records, **extra
        )

    def __exit__(self, *exc: object) -> None:
        """On an error, stop the senders that finish() did not (stop() is idempotent)."""
        for p in [*self.pingers.values(), *([self.tcp] if self.tcp is not None else [])]:
            with contextlib.suppress(Exception):
                p.__exit__(None, None, None)


def agent_log(lab: VmLab, since: float) -> list[tuple[float, str]]:
    """The agent's and the guest kernel's journal since *since* (host epoch s), on the
    host's clock: the guest's own clock is read in the same command and the console's
    round trip halved.  The times are journald's, when it received each line."""
    t0 = time.time()
    back = int(t0 - since) + 2
    out = lab.exec(
        "date +%s.%N; journalctl _SYSTEMD_UNIT=ptmig-agent.service + _TRANSPORT=kernel "
        f"-o short-unix --no-pager --since @$(( $(date +%s) - {back} ))",
        timeout=60,
    ).check()
    t1 = time.time()
    lines = out.splitlines()
    offset = float(lines[0]) - (t0 + t1) / 2  # guest clock - host clock
    entries = []
    for line in lines[1:]:
        stamp, _, rest = line.partition(" ")
        try:
            at = float(stamp) - offset
        except ValueError:
            continue  # "-- No entries --" and the like
        message = rest.split(": ", 1)[-1]
        if at >= since - 0.5:
            entries.append((round(at, 3), message))
    return entries
