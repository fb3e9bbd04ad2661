"""``ptmig-lab bench-evacuate``: evacuate hosta under ping, one domain at a time and then
all at once, with every guest's teams pinged; wall time, per-domain loss and time on standby.

Also the driver the e2e evacuation tests use (:func:`evacuate`): ``ptmig evacuate`` as an
operator types it, with a fixed-rate pinger per team of every guest in the lab
(lab/traffic), and each team's loss lined up with its own domain's phases
(lab/traffic/evacuation.py).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from host.workflow.model import EvacuationReport, from_plain, plain
from lab import GUEST_IP, WAN_GUEST_IP
from lab import coordinated as co
from lab.fabric import CLIENT_NS
from lab.guest import DOMAIN_NAME
from lab.paths import run_dir
from lab.traffic import FixedRatePinger
from lab.traffic.evacuation import DomainTraffic, evacuation_traffic, format_table
from lab.vmlab import LabError, VmLab

log = logging.getLogger(__name__)

RATE = 1000.0
OTHER = {"hosta": "hostb", "hostb": "hosta"}


@dataclass(frozen=True)
class PingTarget:
    domain: str
    team: str
    ip: str


def ping_targets(lab: VmLab) -> list[PingTarget]:
    """Every team of every guest: the main guest's lan and wan, each extra guest's lan."""
    out = [
        PingTarget(DOMAIN_NAME, "lan", GUEST_IP),
        PingTarget(DOMAIN_NAME, "wan", WAN_GUEST_IP),
    ]
    out += [PingTarget(g.name, "lan", g.ip) for g in lab.extra_guests()]
    return out


@dataclass
class EvacuationRun:
    """One ``ptmig evacuate`` under ping: its exit code, its report (read back from its
    JSON) and each team's traffic."""

    source: str
    destination: str
    parallel: int
    exit_code: int
    result: EvacuationReport
    traffic: list[DomainTraffic]
    stderr: str

    def outcomes(self) -> dict[str, str]:
        return {d.domain: str(d.outcome) for d in self.result.domains}

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "parallel": self.parallel,
            "exit_code": self.exit_code,
            "wall_s": self.result.wall_s,
            "outcomes": self.outcomes(),
            "traffic": [t.to_dict() for t in self.traffic],
            "result": plain(self.result),
        }


def evacuate_argv(lab: VmLab, source: str, destination: str, parallel: int) -> list[str]:
    """``ptmig evacuate``'s arguments after ``-c SOURCE``: every domain of *source*."""
    return [
        "evacuate",
        lab.hosts[source].uri,
        "--to",
        lab.hosts[destination].uri,
        "--peer-uri",
        lab.hosts[destination].tcp_uri,
        "--parallel",
        str(parallel),
        "--unsafe",
        "--json",
    ]


def evacuate(
    lab: VmLab,
    source: str,
    destination: str,
    *,
    parallel: int,
    rate: float = RATE,
    name: str = "evacuate",
    timeout: float = 900,
) -> EvacuationRun:
    """``ptmig -c SOURCE evacuate SOURCE --to DESTINATION`` under *rate* pings/s per team;
    the pingers run from 1 s before to 1.5 s after."""
    targets = ping_targets(lab)
    pingers = {
        (t.domain, t.team): FixedRatePinger(
            t.ip,
            run_dir() / f"{name}-{t.domain}-{t.team}.ping",
            rate=rate,
            prefix=["ip", "netns", "exec", CLIENT_NS],
        )
        for t in targets
    }
    started = []
    try:
        for p in pingers.values():
            p.start()
            started.append(p)
        time.sleep(1)
        proc = co.ptmig(
            lab,
            source,
            *evacuate_argv(lab, source, destination, parallel),
            timeout=timeout,
            check=False,
        )
        time.sleep(1.5)
    finally:
        records = {key: p.stop() for key, p in pingers.items() if p in started}
    if not proc.stdout.strip():
        raise LabError(f"ptmig evacuate exited {proc.returncode} with no JSON: {proc.stderr}")
    result = from_plain(EvacuationReport, json.loads(proc.stdout))
    return EvacuationRun(
        source,
        destination,
        parallel,
        proc.returncode,
        result,
        evacuation_traffic(result, records),
        proc.stderr,
    )


def summary(run: EvacuationRun) -> list[str]:
    return [
        f"evacuate {run.source} -> {run.destination} --parallel {run.parallel}: "
        f"exit {run.exit_code}, wall {run.result.wall_s} s",
        *format_table(run.traffic),
    ]


def main(*, guests: int = 3, out: Path | None = None, as_json: bool = False) -> int:
    """Lab up with *guests* guests, every team on its primary; then evacuate hosta ->
    hostb with --parallel 1, back with --parallel *guests*, and hosta -> hostb again with
    --parallel *guests*, all under ping; every run's figures are printed and kept."""
    lab = VmLab()
    runs: list[EvacuationRun] = []
    try:
        lab.up(guests=guests)
        co.configure_all(lab)
        plan = [("hosta", "hostb", 1), ("hostb", "hosta", guests), ("hosta", "hostb", guests)]
        for src, dest, parallel in plan:
            run = evacuate(lab, src, dest, parallel=parallel, name=f"bench-{src}-p{parallel}")
            runs.append(run)
            for line in summary(run):
                print(line, file=sys.stderr)
            if run.exit_code != 0:
                raise LabError(f"evacuation {src} -> {dest} exited {run.exit_code}")
            for name in lab.guest_names():
                lab.check_health(name)
    finally:
        lab.down()
        data = {"guests": guests, "runs": [r.to_dict() for r in runs]}
        if out is not None:
            out.write_text(json.dumps(data, indent=1))
        if as_json:
            print(json.dumps(data, indent=1))
    return 0
