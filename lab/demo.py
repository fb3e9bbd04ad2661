"""The main job: ``ptmig migrate`` of the lab guest hosta -> hostb -> hosta while a client
pings both of its teams at 1000 packets/s, then, in the same run, a plain libvirt
migration of the same guest without its passthrough stand-ins, for comparison; at the
end ``ptmig failover --to primary`` plugs the primaries again, so a lab kept up is ready
for ``ptmig migrate``.

The report gives, per migration, each phase's time and the pings lost in it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from host.domain.domain_xml import parse_domain
from lab import GUEST_IP, WAN_GUEST_IP
from lab import coordinated as co
from lab.fabric import CLIENT_NS
from lab.guest import DOMAIN_NAME, PRIMARY_NIC, WAN_PRIMARY_NIC
from lab.paths import run_dir
from lab.run import CommandError, run
from lab.traffic import FixedRatePinger, Phase, analyze
from lab.vmlab import LabError, VmLab

log = logging.getLogger(__name__)

RATE = 1000.0
SETTLE_S = 1.5
TEAMS = {"lan": GUEST_IP, "wan": WAN_GUEST_IP}
PHASES = ("preflight", "switch", "unplug", "migrate", "bind")


@dataclass
class DemoReport:
    ptmig: list[dict[str, Any]] = field(default_factory=list)
    plain: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rate_pps": RATE, "ptmig_migrate": self.ptmig, "plain_libvirt_migrate": self.plain}

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
        return "\n".join(out)


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


def pingers(name: str, rate: float = RATE) -> dict[str, FixedRatePinger]:
    """A sender per team from the client, each writing run_dir()/demo-NAME-TEAM.ping."""
    return {
        team: FixedRatePinger(
            ip,
            run_dir() / f"demo-{name}-{team}.ping",
            rate=rate,
            prefix=["ip", "netns", "exec", CLIENT_NS],
        )
        for team, ip in TEAMS.items()
    }


def _measure(name: str, action: Any) -> tuple[Any, dict[str, Any], list[Phase] | None]:
    senders = pingers(name)
    for p in senders.values():
        p.start()
    try:
        time.sleep(SETTLE_S)
        start = time.time()
        result, phases = action()
        time.sleep(SETTLE_S)
        end = time.time()
    finally:
        records = {team: p.stop() for team, p in senders.items()}
    phases = phases or [Phase("migration", start, end)]
    lost = {}
    for team, record in records.items():
        report = analyze(record, phases)
        lost[team] = {p.name: p.lost for p in report.phases} | {"total": report.lost}
    return result, lost, phases


def ptmig_round_trip(lab: VmLab) -> list[dict[str, Any]]:
    out = []
    for dest in ("hostb", "hosta"):
        src = lab.where()

        def migrate(dest: str = dest) -> tuple[dict[str, Any], list[Phase]]:
            proc = co.ptmig(
                lab,
                lab.where(),
                "migrate",
                DOMAIN_NAME,
                lab.hosts[dest].uri,
                "--json",
                "--peer-uri",
                lab.hosts[dest].tcp_uri,
                "--unsafe",
                check=False,
            )
            if not proc.stdout:
                raise LabError(f"ptmig migrate failed: {proc.stderr.strip()}")
            report = json.loads(proc.stdout)
            phases = [
                Phase(p["name"], p["started_at"], p["started_at"] + p["seconds"])
                for p in report["phases"]
            ]
            return report, phases

        report, lost, _ = _measure(f"ptmig-{dest}", migrate)
        lab.check_health()
        wall = sum(p["seconds"] for p in report["phases"])
        out.append(
            {
                "route": f"{src} -> {dest}",
                "outcome": report["outcome"],
                "teams": report["teams"],
                "phases": report["phases"],
                "wall_s": wall,
                "downtime_ms": report["migration"].get("downtime_ms"),
                "lost": lost,
                "error": report["error"],
            }
        )
    return out


def plain_round_trip(lab: VmLab) -> list[dict[str, Any]]:
    """The same guest on its standbys only (primaries unplugged), migrated by libvirt."""
    co.ptmig(lab, lab.where(), "failover", DOMAIN_NAME, "--to", "standby")
    for alias in _plugged_primaries(lab):
        lab.detach_nic(alias)
    out = []
    for dest in ("hostb", "hosta"):

        def migrate(dest: str = dest) -> tuple[Any, None]:
            return lab.migrate(dest), None

        result, lost, _ = _measure(f"plain-{dest}", migrate)
        lab.check_health()
        out.append(
            {
                "route": f"{result.source} -> {dest}",
                "wall_s": result.wall_s,
                "downtime_ms": result.downtime_ms,
                "lost": {t: v["total"] for t, v in lost.items()},
            }
        )
    return out


def _plugged_primaries(lab: VmLab) -> list[str]:
    """The lab's own primaries and ptmig's, of those the live domain has."""
    info = parse_domain(lab.domain().XMLDesc(0))
    present = [i.alias for i in info.interfaces if i.alias]
    present += [h.alias for h in info.hostdevs if h.alias]
    ptmig = [a for a in present if a.startswith("ua-ptmig-")]
    return [a for a in (PRIMARY_NIC.alias, WAN_PRIMARY_NIC.alias, *ptmig) if a in present]


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
        report = DemoReport(ptmig=ptmig_round_trip(lab))
        report.plain = plain_round_trip(lab)
        # The comparison unplugged the primaries behind ptmig's back: plug them again
        # through ptmig, so that a lab left up (--keep) is as ptmig recorded it.
        co.wait_for_teams_on_primary(lab)
    finally:
        if started_here and not keep:
            lab.down()
    print(json.dumps(report.to_dict(), indent=1) if as_json else report.format())
    failed = [m for m in report.ptmig if m["outcome"] != "done"]
    return 1 if failed else 0
