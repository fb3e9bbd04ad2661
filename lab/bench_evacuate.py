"""``ptmig-lab bench-evacuate``: evacuate hosta under ping, one domain at a time and then
all at once, with every guest's teams pinged; wall time, per-domain loss and time on standby.
Beside it, the plain-libvirt drain of the same guests at the same parallelism
(:func:`plain_drain`): what an operator without ptmig does by hand, each guest's
passthrough primaries unplugged, the guest live-migrated by libvirt alone
(``lab.migration.libvirt_migrate``), a device from the destination's pool plugged after;
judged against the goal (ptmig's wall <= 1.2x the plain drain's, issue 25).  Each team's
connectivity gap at 100 ms pings stands beside its packets lost (lab.traffic.evacuation),
and the machine's load over the whole run beside the figures (lab.load).

Also the driver the e2e evacuation tests use (:func:`evacuate`): ``ptmig evacuate`` as an
operator types it, with a fixed-rate pinger per team of every guest in the lab
(lab/traffic), and each team's loss lined up with its own domain's phases
(lab/traffic/evacuation.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from host.workflow.model import EvacuationReport, from_plain, plain
from lab import GUEST_IP, WAN_GUEST_IP
from lab import coordinated as co
from lab.fabric import CLIENT_NS
from lab.guest import DOMAIN_NAME, Nic
from lab.load import LoadSampler
from lab.migration import libvirt_migrate
from lab.paths import run_dir
from lab.traffic import FixedRatePinger, Phase, PingRecord
from lab.traffic.evacuation import DomainTraffic, evacuation_traffic, format_table, team_traffic
from lab.vmlab import LabError, VmLab, detach_device

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
    #: The ``ptmig evacuate`` command's own wall, start of the process to its exit.
    command_s: float | None = None

    def outcomes(self) -> dict[str, str]:
        return {d.domain: str(d.outcome) for d in self.result.domains}

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "destination": self.destination,
            "parallel": self.parallel,
            "exit_code": self.exit_code,
            "wall_s": self.result.wall_s,
            "command_s": self.command_s,
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


@contextlib.contextmanager
def pinging(lab: VmLab, name: str, rate: float) -> Iterator[dict[tuple[str, str], PingRecord]]:
    """A fixed-rate pinger per team of every guest from 1 s before to 1.5 s after the
    block; the mapping yielded is filled with each (domain, team)'s record at the end."""
    pingers = {
        (t.domain, t.team): FixedRatePinger(
            t.ip,
            run_dir() / f"{name}-{t.domain}-{t.team}.ping",
            rate=rate,
            prefix=["ip", "netns", "exec", CLIENT_NS],
        )
        for t in ping_targets(lab)
    }
    records: dict[tuple[str, str], PingRecord] = {}
    started = []
    try:
        for p in pingers.values():
            p.start()
            started.append(p)
        time.sleep(1)
        yield records
        time.sleep(1.5)
    finally:
        records.update({key: p.stop() for key, p in pingers.items() if p in started})


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
    with pinging(lab, name, rate) as records:
        t0 = time.monotonic()
        proc = co.ptmig(
            lab,
            source,
            *evacuate_argv(lab, source, destination, parallel),
            timeout=timeout,
            check=False,
        )
        command_s = time.monotonic() - t0
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
        round(command_s, 2),
    )


@dataclass(frozen=True)
class DrainStep:
    """One guest's part of a plain drain: which primaries it unplugged, which devices of
    the destination's pool were plugged, its phases (epoch s) and any error."""

    domain: str
    unplugged: list[str]
    plugged: list[Nic]
    phases: list[Phase] = field(default_factory=list)
    error: str = ""


@dataclass
class PlainDrainRun:
    """The plain-libvirt drain of every guest of *source*, *parallel* at a time."""

    source: str
    destination: str
    parallel: int
    wall_s: float
    steps: list[DrainStep]
    traffic: list[DomainTraffic]

    @property
    def ok(self) -> bool:
        return not any(s.error for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "plain-libvirt drain",
            "source": self.source,
            "destination": self.destination,
            "parallel": self.parallel,
            "wall_s": self.wall_s,
            "steps": [
                {
                    "domain": s.domain,
                    "unplugged": s.unplugged,
                    "plugged": [asdict(n) for n in s.plugged],
                    "phases": [asdict(p) for p in s.phases],
                    "error": s.error,
                }
                for s in self.steps
            ],
            "traffic": [t.to_dict() for t in self.traffic],
        }


def drain_plan(lab: VmLab, destination: str) -> list[DrainStep]:
    """Per guest, its recorded primaries (``ptmig status``: the operator knows his
    devices) and, for each, a device of the destination's pool to plug after, with its
    own MAC (a VF or NIC there has its own); the destination runs no guest yet, so every
    slot is free."""
    slots = iter(co.pool_slots(lab.extra_guests())[destination])
    steps = []
    for name in lab.guest_names():
        aliases = co.primary_aliases(lab, name)
        plugged = []
        for i, _alias in enumerate(aliases):
            try:
                tap, mac = next(slots)
            except StopIteration:
                raise LabError(f"{destination}'s pool has too few devices to drain") from None
            plugged.append(Nic(mac, tap, f"ua-drain{i}"))
        steps.append(DrainStep(name, aliases, plugged))
    return steps


def drain_one(lab: VmLab, step: DrainStep, source: str, destination: str) -> DrainStep:
    """One guest, as an operator drains it by hand, each step on its own connections
    (virsh's): detach its primaries (the bond fails over by its MII monitor), migrate it
    with libvirt alone, attach the destination's devices.  Phases unplug, migrate, plug;
    the guest does not enslave the new devices by itself (the agent would), so the
    plug ends when libvirt has them in the live definition."""
    phases: list[Phase] = []
    src, dst = libvirt.open(lab.hosts[source].uri), libvirt.open(lab.hosts[destination].uri)
    try:
        t0 = time.time()
        dom = src.lookupByName(step.domain)
        for alias in step.unplugged:
            detach_device(dom, alias)
        t1 = time.time()
        phases.append(Phase("unplug", t0, t1))
        libvirt_migrate(dom, dst, lab.hosts[destination].tcp_uri)
        t2 = time.time()
        phases.append(Phase("migrate", t1, t2))
        moved = dst.lookupByName(step.domain)
        for nic in step.plugged:
            moved.attachDeviceFlags(nic.xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)
        phases.append(Phase("plug", t2, time.time()))
        return DrainStep(step.domain, step.unplugged, step.plugged, phases)
    except (libvirt.libvirtError, LabError) as exc:
        return DrainStep(step.domain, step.unplugged, step.plugged, phases, str(exc))
    finally:
        for conn in (src, dst):
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()


def plain_drain(
    lab: VmLab,
    source: str,
    destination: str,
    *,
    parallel: int,
    rate: float = RATE,
    name: str = "plain-drain",
) -> PlainDrainRun:
    """Every guest of *source* drained to *destination* with plain libvirt, *parallel*
    guests at a time, under the same pings as :func:`evacuate`; then (not timed) each
    guest's drained devices unplugged and its teams put back on primaries through ptmig,
    so the next run starts as ptmig recorded it."""
    steps = drain_plan(lab, destination)
    with pinging(lab, name, rate) as records:
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=parallel) as pool:
            done = list(pool.map(lambda s: drain_one(lab, s, source, destination), steps))
        wall = time.monotonic() - t0
    traffic = [
        team_traffic(dom, team, "error" if step.error else "done", step.phases, record)
        for (dom, team), record in sorted(records.items())
        for step in done
        if step.domain == dom
    ]
    run = PlainDrainRun(source, destination, parallel, round(wall, 3), done, traffic)
    for step in done:
        if step.error:
            continue
        dom = lab.domain(destination, step.domain)
        for nic in step.plugged:
            detach_device(dom, nic.alias, config=False)
        co.wait_for_teams_on_primary(lab, name=step.domain)
    return run


def summary(run: EvacuationRun | PlainDrainRun) -> list[str]:
    if isinstance(run, PlainDrainRun):
        errors = [f"{st.domain}: {st.error}" for st in run.steps if st.error]
        head = (
            f"plain-libvirt drain {run.source} -> {run.destination} --parallel "
            f"{run.parallel}: wall {run.wall_s} s" + (f"; errors: {errors}" if errors else "")
        )
    else:
        head = (
            f"evacuate {run.source} -> {run.destination} --parallel {run.parallel}: "
            f"exit {run.exit_code}, wall {run.result.wall_s} s (command {run.command_s} s)"
        )
    return [head, *format_table(run.traffic)]


#: Issue 25's goal: ``ptmig evacuate``'s wall at most this times the plain drain's.
DRAIN_GOAL = 1.2


def judge_drain(runs: list[EvacuationRun | PlainDrainRun], parallel: int) -> dict[str, Any]:
    """ptmig's evacuation wall against the plain drain's at the same *parallel*, medians
    over the runs of each; gaps and loss per run beside them."""
    ptmig = [
        r.result.wall_s for r in runs if isinstance(r, EvacuationRun) and r.parallel == parallel
    ]
    drains = [r.wall_s for r in runs if isinstance(r, PlainDrainRun) and r.parallel == parallel]
    if not ptmig or not drains:
        return {"figure": "evacuate wall / plain drain", "met": None, "measured": "-"}
    p, d = statistics.median(ptmig), statistics.median(drains)
    return {
        "figure": f"ptmig evacuate wall / plain-libvirt drain, --parallel {parallel}",
        "ptmig_wall_s": ptmig,
        "plain_drain_wall_s": drains,
        "measured": f"{p:.2f} / {d:.2f} s = {p / d:.2f}x",
        "ratio": round(p / d, 3),
        "goal": f"<= {DRAIN_GOAL}x",
        "met": p / d <= DRAIN_GOAL,
    }


def main(*, guests: int = 3, out: Path | None = None, as_json: bool = False) -> int:
    """Lab up with *guests* guests, every team on its primary; then, all under ping,
    ``ptmig evacuate`` hosta -> hostb with --parallel 1, back with --parallel *guests*,
    and hosta -> hostb again with --parallel *guests*; then the plain-libvirt drain of the
    same guests hostb -> hosta and hosta -> hostb at --parallel *guests*.  Every run's
    figures are printed and kept, with the machine's load over them."""
    lab = VmLab()
    runs: list[EvacuationRun | PlainDrainRun] = []
    sampler = LoadSampler(lambda: lab.state.pids.values())
    try:
        lab.up(guests=guests)
        co.configure_all(lab)
        plan = [
            ("ptmig", "hosta", "hostb", 1),
            ("ptmig", "hostb", "hosta", guests),
            ("ptmig", "hosta", "hostb", guests),
            ("plain", "hostb", "hosta", guests),
            ("plain", "hosta", "hostb", guests),
        ]
        with sampler:
            for kind, src, dest, parallel in plan:
                name = f"{'bench' if kind == 'ptmig' else 'plain'}-{src}-p{parallel}"
                run: EvacuationRun | PlainDrainRun
                if kind == "ptmig":
                    run = evacuate(lab, src, dest, parallel=parallel, name=name)
                else:
                    run = plain_drain(lab, src, dest, parallel=parallel, name=name)
                runs.append(run)
                for line in summary(run):
                    print(line, file=sys.stderr)
                failed = run.exit_code != 0 if isinstance(run, EvacuationRun) else not run.ok
                if failed:
                    raise LabError(f"{kind} {src} -> {dest} failed")
                for guest in lab.guest_names():
                    lab.check_health(guest)
    finally:
        lab.down()
        load = sampler.record
        if load is not None:
            print(load.summary(), file=sys.stderr)
        data = {
            "guests": guests,
            "rate_pps": RATE,
            "goal": judge_drain(runs, guests),
            "machine_load": load.to_dict() if load is not None else None,
            "runs": [r.to_dict() for r in runs],
        }
        if out is not None:
            out.write_text(json.dumps(data, indent=1))
        if as_json:
            print(json.dumps(data, indent=1))
    return 0
