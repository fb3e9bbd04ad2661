"""The main job: live-migrate the lab guest hosta -> hostb -> hosta while a client pings it.

Until the coordinator exists this migrates with libvirt directly; the report says how many
of the client's fixed-rate pings were lost in each migration and the longest gap.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import CLIENT_IP, GUEST_IP
from lab.fabric import CLIENT_NS
from lab.paths import run_dir
from lab.run import CommandError, run
from lab.traffic import FixedRatePinger, Phase, analyze
from lab.vmlab import LabError, MigrationResult, VmLab

log = logging.getLogger(__name__)

RATE = 1000.0
SETTLE_S = 2.0


@dataclass
class DemoReport:
    migrations: list[dict[str, Any]] = field(default_factory=list)
    sent: int = 0
    lost: int = 0
    longest_outage_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"rate_pps": RATE, "sent": self.sent, "lost": self.lost,
                "longest_outage_ms": self.longest_outage_ms, "migrations": self.migrations}

    def format(self) -> str:
        lines = [f"client -> guest at {RATE:.0f} packets/s: {self.sent} sent, {self.lost} lost, "
                 f"longest outage {self.longest_outage_ms:.1f} ms", ""]
        lines.append(f"{'migration':<16}{'wall s':>8}{'downtime ms':>13}{'lost':>7}"
                     f"{'longest gap ms':>16}")
        for m in self.migrations:
            lines.append(f"{m['source'] + ' -> ' + m['destination']:<16}{m['wall_s']:>8.2f}"
                         f"{m['downtime_ms'] if m['downtime_ms'] is not None else '-':>13}"
                         f"{m['lost']:>7}{m['longest_outage_ms']:>16.1f}")
        return "\n".join(lines)


def wait_reachable(timeout: float = 60.0) -> None:
    """The guest's address answers the client (networkd configures the bond after login)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            run(["ip", "netns", "exec", CLIENT_NS, "ping", "-c", "1", "-W", "1", GUEST_IP])
            return
        except CommandError:
            time.sleep(0.5)
    raise LabError(f"the client {CLIENT_IP} cannot reach the guest {GUEST_IP}")


def migrate_round_trip(lab: VmLab, route: tuple[str, ...] = ("hostb", "hosta")) -> DemoReport:
    """Migrate along *route* under fixed-rate ping; check the guest's health after each move."""
    wait_reachable()
    phases: list[Phase] = []
    results: list[MigrationResult] = []
    record_file = Path(run_dir()) / "demo.ping"
    with FixedRatePinger(GUEST_IP, record_file, rate=RATE,
                         prefix=["ip", "netns", "exec", CLIENT_NS]) as pinger:
        time.sleep(SETTLE_S)
        for dest in route:
            start = time.time()
            result = lab.migrate(dest)
            time.sleep(SETTLE_S)
            phases.append(Phase(f"{result.source}->{dest}", start, time.time()))
            results.append(result)
            lab.check_health()
        record = pinger.stop()
    traffic = analyze(record, phases).to_dict()
    report = DemoReport(sent=traffic["sent"], lost=traffic["lost"],
                        longest_outage_ms=traffic["longest_outage_ms"])
    by_name = {ph["name"]: ph for ph in traffic["phases"]}
    for phase, result in zip(phases, results, strict=True):
        ph = by_name[phase.name]
        report.migrations.append({**result.to_dict(), "lost": ph["lost"],
                                  "longest_outage_ms": ph["longest_outage_ms"]})
    return report


def main(*, as_json: bool, keep: bool) -> int:
    lab = VmLab()
    started_here = lab.state.netns == []
    if started_here:
        log.info("starting the lab")
        lab.up()
    try:
        report = migrate_round_trip(lab)
    finally:
        if started_here and not keep:
            lab.down()
    print(json.dumps(report.to_dict(), indent=1) if as_json else report.format())
    return 0
