"""The main job: ``ptmig migrate`` of the lab guest hosta -> hostb -> hosta while a client
pings both of its teams at 1000 packets/s, then, in the same run, a plain libvirt
migration of the same guest without its passthrough stand-ins, for comparison; at the
end ``ptmig failover --to primary`` plugs the primaries again, so a lab kept up is ready
for ``ptmig migrate``.

The report gives, per migration, each phase's time and the pings lost in it, with the
machine's load over the run beside them (lab.load: a figure taken on a busy machine says
so).  The JSON also has, per ptmig migration, each outage (when, how long, in which
phase) and the log lines around it on the host's clock: ``ptmig -v``'s and the agent's
(lab.measure.agent_log), to tell what ran when a phase outside the data path lost.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from host.workflow.model import plain
from lab import coordinated as co
from lab.load import LoadSampler, MachineLoad
from lab.measure import RATE, TEAMS, Recorder, agent_log, wait_reachable
from lab.traffic import analyze
from lab.vmlab import VmLab

log = logging.getLogger(__name__)

PHASES = ("preflight", "switch", "unplug", "migrate", "bind")


@dataclass
class DemoReport:
    ptmig: list[dict[str, Any]] = field(default_factory=list)
    plain: list[dict[str, Any]] = field(default_factory=list)
    load: MachineLoad | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "rate_pps": RATE,
            "machine_load": self.load.to_dict() if self.load is not None else None,
            "ptmig_migrate": self.ptmig,
            "plain_libvirt_migrate": self.plain,
        }

    def format(self) -> str:
        out = [
            f"ptmig migrate: teams lan (MAC policy preserve) and wan (follow) on e1000e "
            f"primaries; the client pings each team at {RATE:.0f}/s",
            f"{'':16}" + "".join(f"{p:>11}" for p in PHASES) + f"{'total':>9}"
            f"{'downtime':>10}{'outcome':>9}",
        ]
        for m in self.ptmig:
            times = {p["name"]: p["seconds"] for p in m["phases"]}
            out.append(
                f"{m['route']:<16}"
                + "".join(f"{times.get(p, 0):>10.2f}s" for p in PHASES)
                + f"{m['wall_s']:>8.2f}s{m['downtime_ms'] or '-':>8} ms{m['outcome']:>9}"
            )
            for team in TEAMS:
                lost = m["lost"][team]
                out.append(
                    f"{'  lost ' + team:<16}"
                    + "".join(f"{lost.get(p, 0):>11}" for p in PHASES)
                    + f"{lost['total']:>9}"
                )
        out += [
            "",
            "plain libvirt live migration of the same guest, virtio NICs only:",
            f"{'':16}{'wall':>10}{'downtime':>12}{'lost lan':>10}{'lost wan':>10}",
        ]
        for m in self.plain:
            out.append(
                f"{m['route']:<16}{m['wall_s']:>9.2f}s{m['downtime_ms'] or '-':>9} ms"
                f"{m['lost']['lan']:>10}{m['lost']['wan']:>10}"
            )
        if self.load is not None:
            out += ["", self.load.summary()]
        return "\n".join(out)


def ptmig_round_trip(lab: VmLab) -> list[dict[str, Any]]:
    out = []
    for dest in ("hostb", "hosta"):
        src = lab.where()
        with Recorder(f"demo-ptmig-{dest}", tcp=False) as rec:
            moved = co.migrate(lab, dest, verbose=True)
            rec.phases += moved.phases
            sample = rec.finish("ptmig", f"{src} -> {dest}", moved.wall_s)
        lab.check_health()
        report = moved.report
        start = min((p.start for p in sample.phases), default=0.0)
        out.append(
            {
                "route": sample.route,
                "outcome": str(report.outcome),
                "teams": plain(report.teams),
                "phases": plain(report.phases),
                "wall_s": moved.wall_s,
                "downtime_ms": moved.downtime_ms,
                "lost": sample.lost_with_totals(),
                "error": report.error,
                "outages": {
                    team: [
                        {
                            "phase": o.phase,
                            "at": round(o.start_ns / 1e9, 3),
                            "ms": round(o.duration_ns / 1e6, 1),
                            "lost": o.lost,
                        }
                        for o in analyze(record, sample.phases).outages
                    ]
                    for team, record in sample.records.items()
                },
                "ptmig_log": moved.log(),
                "agent_log": agent_log(lab, start),
            }
        )
    return out


def plain_round_trip(lab: VmLab) -> list[dict[str, Any]]:
    """The same guest on its standbys only (primaries unplugged), migrated by libvirt."""
    co.unplug_primaries(lab)
    out = []
    for dest in ("hostb", "hosta"):
        with Recorder(f"demo-plain-{dest}", tcp=False) as rec:
            result = lab.migrate(dest)
            sample = rec.finish("plain", f"{result.source} -> {dest}", result.wall_s)
        lab.check_health()
        out.append(
            {
                "route": sample.route,
                "wall_s": result.wall_s,
                "downtime_ms": result.downtime_ms,
                "lost": {t: sample.total_lost(t) for t in sample.lost},
            }
        )
    return out


def main(*, as_json: bool, keep: bool) -> int:
    lab = VmLab()
    started_here = not lab.state.netns
    if started_here:
        log.info("starting the lab")
        lab.up()
    try:
        for ip in TEAMS.values():
            wait_reachable(ip)
        co.configure(lab)
        with LoadSampler(lab.state.pids.values()) as sampler:
            report = DemoReport(ptmig=ptmig_round_trip(lab))
            report.plain = plain_round_trip(lab)
        report.load = sampler.record
        # The comparison unplugged the primaries behind ptmig's back: plug them again
        # through ptmig, so that a lab left up (--keep) is as ptmig recorded it.
        co.wait_for_teams_on_primary(lab)
    finally:
        if started_here and not keep:
            lab.down()
    print(json.dumps(report.to_dict(), indent=1) if as_json else report.format())
    failed = [m for m in report.ptmig if m["outcome"] != "done"]
    return 1 if failed else 0
