"""Downtime benchmark: what a guest's traffic loses when it migrates, by approach.

Cases, each a round trip hosta -> hostb -> hosta of the same lab guest, repeated:

* floor: plain libvirt live migration with the guest on its virtio NICs only;
* floor-postcopy, floor-downtime100, floor-downtime20, floor-ptmig: the same guest,
  migrated by ptmig's own call (``Domain.migrate``) with one choice each (FLOOR_VARIANTS),
  interleaved with the floor repetition by repetition; floor-ptmig is ptmig's default;
* naive: hot-unplug the *active* e1000e stand-ins with no switch first, migrate with
  libvirt, then plug a device from the destination's pool and bind it (what a management
  layer without a guest agent does, helped by our agent for the rebind);
* ptmig: ``ptmig migrate``; team lan shows MAC policy preserve, team wan follow;
* upstream: the same guest booted as a QEMU virtio-net failover pair (libvirt
  ``<teaming>`` + ``failover_pair_id``) with Linux net_failover instead of a bond, migrated
  by libvirt; only team lan's pair exists there.

The client sends 1000 packets/s to each team's address for the whole run; losses are
counted per phase from the send times (lab.traffic).  Also measured: the bare time from
attaching an e1000e to the guest seeing it with carrier (hotplug + driver probe), under
the cases' traffic (the limit for "back on the passthrough device") and idle.  Beside the
pings, a TCP stream of 1 MiB/s to team lan gives what a user's connection feels: its
longest stall and its retransmits.
The goals are issue 13's table (:func:`goals`), each judged "met" / "not met" from the
run's own figures; progress goes to stderr while it runs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
import shlex
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from host.hypervisor import Hypervisor
from host.migration_options import MigrationOptions
from host.workflow.model import BindTiming, Outcome
from lab import GUEST_IP
from lab import coordinated as co
from lab.guest import DOMAIN_NAME, Nic
from lab.load import LoadSampler
from lab.measure import RATE, SETTLE_S, TEAMS, Recorder, Sample, agent_log, wait_reachable
from lab.traffic.tcp import SINK_PORT, SINK_SCRIPT
from lab.vmlab import LabError, VmLab


def start_tcp_sink(lab: VmLab) -> None:
    """The TCP stream's sink in the guest, detached from the console's shell; returns once
    it listens (python3 takes about a second to start under TCG).  No ``exit``: the
    console evaluates commands in its one shell."""
    listening = f"ss -Hltn 'sport = :{SINK_PORT}' | grep -q ."
    lab.exec(
        f"setsid python3 -c {shlex.quote(SINK_SCRIPT)} </dev/null >/dev/null 2>&1 & "
        f"for i in $(seq 200); do {listening} && break; sleep 0.1; done; {listening}",
        timeout=60,
    ).check()


def run_ptmig(lab: VmLab, dest: str, binds: list[BindBreakdown] | None = None) -> Sample:
    """One ``ptmig migrate``; each team's bind, both sides' steps, appended to *binds*."""
    src = lab.where()
    with Recorder(f"bench-ptmig-{dest}") as rec:
        moved = co.migrate(lab, dest)
        rec.phases += moved.phases
        bind = next(p for p in moved.report.phases if p.name == "bind")
        sample = rec.finish(
            "ptmig",
            f"{src}->{dest}",
            moved.wall_s,
            back_on_primary_s=bind.seconds,
            downtime_ms=moved.downtime_ms,
        )
    if moved.report.outcome is not Outcome.DONE:
        raise LabError(f"ptmig migrate ended {moved.report.outcome}: {moved.report.error}")
    sample.agent_log = agent_log(lab, min(p.start for p in sample.phases))
    if binds is not None:
        route = f"{src}->{dest}"
        binds += [
            bind_breakdown(team, route, timing, sample.agent_log)
            for team, timing in sorted(moved.report.binds.items())
        ]
    lab.check_health()
    return sample


@dataclass(frozen=True)
class BindBreakdown:
    """Where one team's bind went, in seconds from its attach call, on the host's clock:
    the coordinator's own times (``MigrationReport.binds``) and the guest's steps from its
    kernel's and agent's log lines (journald's reception times, the clock offset measured
    over the console: about +-0.05 s).  None: the line was not found."""

    team: str
    route: str
    device: str
    attach_returned: float
    device_added: float | None  # libvirt's DEVICE_ADDED reached the coordinator
    bind_called: float  # the coordinator called BindPrimary
    pci_found: float | None  # kernel: the hot-plugged function enumerated
    netdev: float | None  # kernel: the driver registered its netdev (ethN)
    renamed: float | None  # udev renamed it (enpNs0)
    agent_saw: float | None  # agent: the link is there, udev not done with it
    agent_found: float | None  # agent: "binding" (device found, udev done)
    enslaved_up: float | None  # agent: MAC set (preserve), enslaved and up
    carrier: float | None  # agent: carrier seen
    made_active: float | None  # kernel: the bond made it the active member
    active: float | None  # agent: "bound and active" (verified)
    bind_reply: float  # the coordinator had the agent's answer


#: The guest's steps of one bind: (field, pattern); {pci}, {dev}, {team} filled in.
GUEST_STEPS = (
    ("pci_found", r"pci {pci}: \["),
    ("netdev", r"{pci} eth\d+: "),
    ("renamed", r"{dev}: renamed from "),
    ("agent_saw", r"team {team}: \S+ is there; waiting for udev"),
    ("agent_found", r"team {team}: binding {dev} "),
    ("enslaved_up", r"team {team}: {dev} in \S+ and up"),
    ("carrier", r"team {team}: {dev} has carrier"),
    ("made_active", r"\(slave {dev}\): making interface (?:{dev} )?the new active one"),
    ("active", r"team {team}: {dev} bound and active"),
)


def bind_breakdown(
    team: str, route: str, timing: BindTiming, log: list[tuple[float, str]]
) -> BindBreakdown:
    """*team*'s bind from the coordinator's *timing* and the guest's *log* (host clock)."""
    t0 = timing.attach_called
    found = next(
        (
            m
            for _, line in log
            if (
                m := re.search(
                    rf"team {re.escape(team)}: binding (\S+) \(device with pci ([0-9a-f:.]+)", line
                )
            )
        ),
        None,
    )
    dev, pci = (found.group(1), found.group(2)) if found else ("", "")
    steps: dict[str, float | None] = {}
    for name, pattern in GUEST_STEPS:
        steps[name] = None
        if not dev:
            continue
        wanted = re.compile(
            pattern.format(pci=re.escape(pci), dev=re.escape(dev), team=re.escape(team))
        )
        at = next((t for t, line in log if t >= t0 - 0.5 and wanted.search(line)), None)
        steps[name] = None if at is None else round(at - t0, 3)
    added = timing.device_added
    return BindBreakdown(
        team=team,
        route=route,
        device=dev,
        attach_returned=round(timing.attach_returned - t0, 3),
        bind_called=round(timing.bind_called - t0, 3),
        device_added=None if added is None else round(added - t0, 3),
        bind_reply=round(timing.bound - t0, 3),
        **steps,
    )


def breakdown_summary(binds: list[BindBreakdown]) -> dict[str, dict[str, float]]:
    """Per step, the median (and spread) of its seconds from the attach call, every
    team's bind together; a step no bind logged is left out."""
    out = {}
    for f in fields(BindBreakdown):
        if f.name in ("team", "route", "device"):
            continue
        values = [v for b in binds if (v := getattr(b, f.name)) is not None]
        if values:
            out[f.name] = _stats(values)
    return out


def run_naive(lab: VmLab, dest: str) -> Sample:
    src = lab.where()
    with Recorder(f"bench-naive-{dest}") as rec:
        t0 = time.time()
        for alias in co.primary_aliases(lab):
            lab.detach_nic(alias)
        t1 = time.time()
        rec.phase("unplug", t0, t1)
        result = lab.migrate(dest)
        t2 = time.time()
        rec.phase("migrate", t1, t2)
        co.ptmig(lab, dest, "failover", DOMAIN_NAME, "--to", "primary")
        t3 = time.time()
        rec.phase("plug", t2, t3)
        sample = rec.finish(
            "naive",
            f"{src}->{dest}",
            t3 - t0,
            back_on_primary_s=t3 - t2,
            downtime_ms=result.downtime_ms,
        )
    lab.check_health()
    return sample


def run_floor(lab: VmLab, dest: str) -> Sample:
    src = lab.where()
    with Recorder(f"bench-floor-{dest}") as rec:
        t0 = time.time()
        result = lab.migrate(dest)
        t1 = time.time()
        rec.phase("migrate", t0, t1)
        sample = rec.finish("floor", f"{src}->{dest}", t1 - t0, downtime_ms=result.downtime_ms)
    lab.check_health()
    return sample


@dataclass(frozen=True)
class FloorVariant:
    """The floor guest migrated by ptmig's own migration call (host.hypervisor) with one
    of the choices a virtio-only guest allows, to compare against libvirt's defaults."""

    case: str
    what: str
    options: MigrationOptions
    max_downtime_ms: int | None = None


LIBVIRTS = MigrationOptions(libvirt_defaults=True)
FLOOR_VARIANTS = {
    v.case: v
    for v in (
        FloorVariant(
            "floor-postcopy",
            "post-copy after the first pass",
            MigrationOptions(postcopy=True, libvirt_defaults=True),
        ),
        FloorVariant("floor-downtime100", "max downtime 100 ms", LIBVIRTS, max_downtime_ms=100),
        FloorVariant("floor-downtime20", "max downtime 20 ms", LIBVIRTS, max_downtime_ms=20),
        FloorVariant(
            "floor-ptmig",
            "ptmig's default: max downtime 50 ms for 5 passes, then 300",
            MigrationOptions(),
        ),
    )
}


def run_floor_variant(lab: VmLab, dest: str, variant: FloorVariant) -> Sample:
    src = lab.where()
    with (
        Hypervisor(lab.hosts[src].uri) as source,
        Hypervisor(lab.hosts[dest].uri) as destination,
    ):
        dom = source.domain(DOMAIN_NAME)
        persistent = dom.xml(inactive=True)
        with Recorder(f"bench-{variant.case}-{dest}") as rec:
            t0 = time.time()
            stats = dom.migrate(
                destination,
                persistent_xml=persistent,
                peer_uri=lab.hosts[dest].tcp_uri,
                unsafe=True,
                options=variant.options,
                max_downtime_ms=variant.max_downtime_ms,
            )
            t1 = time.time()
            rec.phase("migrate", t0, t1)
            sample = rec.finish(
                variant.case, f"{src}->{dest}", t1 - t0, downtime_ms=stats.downtime_ms
            )
    lab.check_health()
    return sample


UPSTREAM_POST_S = 6.0  # net_failover's outage comes ~2.5 s after the primary is back


def run_upstream(lab: VmLab, dest: str) -> Sample:
    """The failover guest: libvirt migrates, QEMU unplugs and replugs the primary itself."""
    src = lab.where()
    with Recorder(f"bench-upstream-{dest}", teams=("lan",)) as rec:
        t0 = time.time()
        result = lab.migrate(dest)
        t1 = time.time()
        rec.phase("migrate", t0, t1)
        time.sleep(UPSTREAM_POST_S)
        rec.phase("post", t1, time.time())
        sample = rec.finish("upstream", f"{src}->{dest}", t1 - t0, downtime_ms=result.downtime_ms)
    lab.check_health()
    return sample


def boot_upstream(lab: VmLab) -> None:
    """Replace the guest by its QEMU-failover variant (team lan's pair only)."""
    from lab.guest import failover_domain_xml
    from lab.image import GuestImage

    image = GuestImage(Path(lab.state.image))
    lab.remove_guest()
    lab.boot_guest(image, definition=lambda disk: failover_domain_xml(image, disk))
    wait_reachable(GUEST_IP)
    # the primary is registered only once the guest acknowledged the failover feature
    lab.exec(
        "for i in $(seq 300); do [ -e /sys/class/net/enp1s0/lower_enp2s0 ] && "
        '[ "$(cat /sys/class/net/enp2s0/carrier 2>/dev/null)" = 1 ] && break; '
        "sleep 0.1; done; ls /sys/class/net/enp1s0/ | grep lower_",
        timeout=60,
    ).check()


def bare_hotplug_probe(lab: VmLab, reps: int, *, under_traffic: bool, nics: int = 1) -> list[float]:
    """Attach *nics* e1000e at once and time it until the guest has them all with carrier;
    then unplug.

    *under_traffic*: with the pings and the TCP stream every migration case has (2000
    packets/s and 1 MiB/s keep the TCG guest's two vCPUs busy), so the limit for "back on
    the passthrough device" is measured in the conditions of ptmig's bind.  *nics* 2: what
    a migration of both teams asks of the guest's kernel, which probes hot-plugged PCI
    functions one at a time (pciehp under the PCI rescan lock)."""
    out = []
    for i in range(reps):
        with Recorder(f"bench-bare-{nics}-{i}") if under_traffic else contextlib.nullcontext():
            out.append(_probe_once(lab, [next(_PROBE_NICS) for _ in range(nics)]))
    return out


#: Each probe NIC of a run its own number, so its MAC, tap and alias are new.
_PROBE_NICS = itertools.count(1)


def _probe_once(lab: VmLab, numbers: list[int]) -> float:
    """One attach of a probe NIC per number, timed until the guest has each up with carrier."""
    nics = [
        Nic(f"52:54:00:ee:{i >> 8:02x}:{i & 0xFF:02x}", f"ptv-probe{i}", f"ua-probe{i}")
        for i in numbers
    ]
    macs = " ".join(nic.mac for nic in nics)
    # A device must be up to have carrier: bring each up as soon as it is there (what
    # any binding must do too), then wait for carrier.  Bash's own `read` and `[`, no
    # process per file read: under TCG each fork costs tens of ms, and the loop would
    # time its own reads (twice as many with two NICs).
    script = (
        f"for n in $(seq 3000); do left=0; for mac in {macs}; do found=0; "
        f"for d in /sys/class/net/*; do "
        f"read -r a < $d/address 2>/dev/null || continue; "
        f'[ "$a" = $mac ] || continue; '
        f"c=; read -r c < $d/carrier 2>/dev/null; "
        f'if [ "$c" = 1 ]; then found=1; else ip link set dev ${{d##*/}} up 2>/dev/null; fi; '
        f"done; [ $found = 1 ] || left=1; done; [ $left = 0 ] && exit 0; "
        f"sleep 0.01; done; exit 1"
    )
    # The guest waits first (its own loop), the host attaches; the waiting command's
    # return closes the interval (console round trip about 0.1 s included, stated).
    done: dict[str, Any] = {}

    def wait(script: str = script, done: dict[str, Any] = done) -> None:
        try:
            done["result"] = lab.exec(f"bash -c {shlex.quote(script)}", timeout=90)
        except Exception as exc:  # reported below, in the main thread
            done["error"] = exc
        done["t"] = time.monotonic()

    thread = threading.Thread(target=wait)
    thread.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    for nic in nics:
        lab.attach_nic(nic)
    thread.join()
    if "error" in done:
        raise LabError(f"probe NICs {macs}: {done['error']}")
    if done["result"].status != 0:
        raise LabError(f"probe NICs {macs}: not all came up with carrier")
    for nic in nics:
        lab.detach_nic(nic.alias)
    return float(done["t"] - t0)


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(
    samples: list[Sample],
    bare: list[float],
    agent: dict[str, float] | None = None,
    *,
    bare_idle: list[float] | None = None,
    bare_pair: list[float] | None = None,
) -> dict[str, Any]:
    """Median and spread per case and team; the first ptmig migration's phases against the
    second's; the agent's figures (*agent*: ``vmrss_mib``, ``startup_s``) when measured."""
    out: dict[str, Any] = {
        "cases": {},
        "bare_hotplug_probe_s": _stats(bare),
        "bare_hotplug_probe_idle_s": _stats(bare_idle or []),
        "bare_hotplug_probe_pair_s": _stats(bare_pair or []),
    }
    for case in sorted({s.case for s in samples}):
        group = [s for s in samples if s.case == case]
        entry: dict[str, Any] = {"wall_s": _stats([s.wall_s for s in group])}
        backs = [s.back_on_primary_s for s in group if s.back_on_primary_s is not None]
        if backs:
            entry["back_on_primary_s"] = _stats(backs)
        for team in TEAMS:
            if not all(team in s.lost for s in group):
                continue  # a case without this team (upstream has lan's pair only)
            phases = sorted({p for s in group for p in s.lost[team]})
            entry[team] = {
                "total_lost": _stats([float(s.total_lost(team)) for s in group]),
                "lost_by_phase": {
                    p: _stats([float(s.lost[team].get(p, 0)) for s in group]) for p in phases
                },
            }
        tcps = [x.tcp for x in group if x.tcp is not None]
        if tcps:
            entry["tcp"] = {
                "longest_stall_ms": _stats([t.longest_stall_ms for t in tcps]),
                "retransmits": _stats([float(t.retransmits) for t in tcps]),
            }
        out["cases"][case] = entry
    ptmig = [s for s in samples if s.case == "ptmig"]
    if len(ptmig) >= 2:
        first, second = ptmig[0], ptmig[1]
        out["first_migration"] = {
            p.name: {"first_s": p.end - p.start, "second_s": second.phase_seconds(p.name)}
            for p in first.phases
        }
    floor = out["cases"].get("floor", {}).get("lan")
    choices = {}
    for case, variant in FLOOR_VARIANTS.items():
        lan = out["cases"].get(case, {}).get("lan")
        if lan is None:
            continue
        lost = lan["total_lost"]["median"]
        choices[case] = {
            "what": variant.what,
            "lost_median": lost,
            "lost_max": lan["total_lost"]["max"],
            "floor_lost_median": floor["total_lost"]["median"] if floor else None,
            "ratio_to_floor": (
                round(lost / floor["total_lost"]["median"], 3)
                if floor and floor["total_lost"]["median"]
                else None
            ),
        }
    if choices:
        out["floor_choices"] = choices
    if agent is not None:
        out["agent"] = agent
    return out


@dataclass(frozen=True)
class Goal:
    """One row of issue 13's table: the figure, what this run measured, and the verdict
    (None: not measured in this run, so not claimed)."""

    figure: str
    measured: str
    goal: str
    met: bool | None

    @property
    def verdict(self) -> str:
        return {True: "met", False: "not met", None: "not measured"}[self.met]


def _p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile: of 6 samples, the 6th; of 10, the 9th."""
    ordered = sorted(values)
    return ordered[math.ceil(0.9 * len(ordered)) - 1]


def goals(summary: dict[str, Any], samples: list[Sample]) -> list[Goal]:
    """Issue 13's goals, each judged from this run's own figures."""
    cases = summary["cases"]
    out: list[Goal] = []

    def stat(case: str, *path: str, key: str = "median") -> float | None:
        node: Any = cases.get(case)
        for part in path:
            if node is None:
                return None
            node = node.get(part)
        return None if node is None else float(node[key])

    for team in TEAMS:
        p, f = stat("ptmig", team, "total_lost"), stat("floor", team, "total_lost")
        pmax, fmax = (stat(c, team, "total_lost", key="max") for c in ("ptmig", "floor"))
        if p is None or f is None or pmax is None or fmax is None:
            out.append(Goal(f"{team}: lost, ptmig / floor", "-", "<= 1.03x, max <= floor's", None))
        else:
            ratio = p / f if f else math.inf
            out.append(
                Goal(
                    f"{team}: lost, ptmig / floor",
                    f"{p:.0f} / {f:.0f} = {ratio:.2f}x; max {pmax:.0f} vs {fmax:.0f}",
                    "<= 1.03x median, max <= floor's max",
                    ratio <= 1.03 and pmax <= fmax,
                )
            )
    p, f = stat("floor-ptmig", "lan", "total_lost"), stat("floor", "lan", "total_lost")
    out.append(
        Goal(
            "stretch: ptmig's migration choices / libvirt's defaults, virtio-only guest",
            f"{p:.0f} / {f:.0f} = {p / f:.2f}x" if p is not None and f else "-",
            "< 0.5x (floor-ptmig vs floor, same run)",
            None if p is None or not f else p / f < 0.5,
        )
    )
    p, u = stat("ptmig", "lan", "total_lost"), stat("upstream", "lan", "total_lost")
    if p is None or u is None or not u:
        out.append(Goal("lan: lost, ptmig / upstream net_failover", "-", "<= 0.2x", None))
    else:
        out.append(
            Goal(
                "lan: lost, ptmig / upstream net_failover",
                f"{p:.0f} / {u:.0f} = {p / u:.2f}x",
                "<= 0.2x",
                p / u <= 0.2,
            )
        )
    ptmig = [s for s in samples if s.case == "ptmig"]
    for team in TEAMS:
        switch = [float(s.lost[team].get("switch", 0)) for s in ptmig if team in s.lost]
        out.append(
            Goal(
                f"{team}: lost in switch to standby, 90th percentile",
                f"{_p90(switch):.0f} (of {len(switch)})" if switch else "-",
                "<= 2",
                _p90(switch) <= 2 if switch else None,
            )
        )
    back, bare = stat("ptmig", "back_on_primary_s"), summary["bare_hotplug_probe_s"]
    pair = summary.get("bare_hotplug_probe_pair_s")
    if back is None or not bare:
        out.append(Goal("back on the passthrough device", "-", "<= 1.3x bare hotplug", None))
    else:
        both = (
            f" (both teams' two at once: {pair['median']:.2f} s, {back / pair['median']:.2f}x)"
            if pair
            else ""
        )
        out.append(
            Goal(
                "back on the passthrough device",
                f"{back:.2f} s vs bare hotplug+probe under traffic {bare['median']:.2f} s "
                f"= {back / bare['median']:.2f}x" + both,
                "<= 1.3x bare",
                back <= 1.3 * bare["median"],
            )
        )
    wall, floor = stat("ptmig", "wall_s"), stat("floor", "wall_s")
    unplugs = [u for s in ptmig if (u := s.phase_seconds("unplug")) is not None]
    if wall is None or floor is None or not bare or not unplugs:
        out.append(Goal("whole ptmig migrate, wall", "-", "<= 1.2x floor+unplug+bare", None))
    else:
        limit = floor + statistics.median(unplugs) + bare["median"]
        out.append(
            Goal(
                "whole ptmig migrate, wall",
                f"{wall:.2f} s vs {floor:.2f} + {statistics.median(unplugs):.2f} + "
                f"{bare['median']:.2f} = {limit:.2f} s ({wall / limit:.2f}x)",
                "<= 1.2x plain migration + unplug + bare hotplug",
                wall <= 1.2 * limit,
            )
        )
    first = summary.get("first_migration")
    if not first:
        out.append(Goal("first migration of the run", "-", "preflight < 1 s", None))
    else:
        pre = first.get("preflight", {}).get("first_s")
        worst = max(
            ((name, v["first_s"] / v["second_s"]) for name, v in first.items() if v["second_s"]),
            key=lambda item: item[1],
            default=("-", 0.0),
        )
        out.append(
            Goal(
                "first migration of the run",
                f"preflight {pre:.2f} s; worst phase {worst[0]} {worst[1]:.2f}x the second's"
                if pre is not None
                else "-",
                "preflight < 1 s, no phase > 1.5x the second migration's",
                None if pre is None else pre < 1.0 and worst[1] <= 1.5,
            )
        )
    agent = summary.get("agent") or {}
    rss, start = agent.get("vmrss_mib"), agent.get("startup_s")
    out.append(
        Goal(
            "agent idle memory",
            f"VmRSS {rss:.1f} MiB" if rss is not None else "-",
            "<= 36 MiB",
            None if rss is None else rss <= 36,
        )
    )
    out.append(
        Goal(
            "agent start to serving (median)",
            f"{start:.2f} s" if start is not None else "-",
            "<= 1.0 s",
            None if start is None else start <= 1.0,
        )
    )
    return out


def plot_timeline(samples: list[Sample], path: Path) -> None:
    """One row per sample: lost packets of team lan over time, phases shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [s for s in samples if "lan" in s.records]
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.4 * len(rows) + 1), squeeze=False)
    colors = {
        "preflight": "#dddddd",
        "switch": "#ffd27f",
        "unplug": "#ff9f7f",
        "migrate": "#9fc5ff",
        "bind": "#a8e6a1",
        "plug": "#a8e6a1",
    }
    for ax, s in zip(axes[:, 0], rows, strict=True):
        rec = s.records["lan"]
        t0 = min(p.start for p in s.phases) - SETTLE_S
        lost = [
            send / 1e9 - t0
            for send, recv in zip(rec.send_ns, rec.recv_ns, strict=True)
            if recv is None
        ]
        for p in s.phases:
            ax.axvspan(p.start - t0, p.end - t0, color=colors.get(p.name, "#eeeeee"), lw=0)
            ax.text(p.start - t0, 1.02, p.name, fontsize=7, transform=ax.get_xaxis_transform())
        ax.eventplot(lost, colors="crimson", linelengths=0.8)
        ax.set_yticks([])
        ax.set_ylabel(f"{s.case}\n{s.route}", rotation=0, ha="right", va="center", fontsize=8)
        ax.set_xlim(0, max((p.end for p in s.phases), default=t0) - t0 + SETTLE_S)
    axes[-1, 0].set_xlabel("seconds (red: pings to team lan lost, 1000/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


class Progress:
    """One line per migration on stderr: which case, which repetition, how long so far."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def __call__(self, what: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.t0
        print(f"[{self.done}/{self.total} {elapsed:5.0f} s] {what}", file=sys.stderr, flush=True)


CASES = ("ptmig", "naive", "floor", *FLOOR_VARIANTS, "upstream")


def parse_cases(text: str | None) -> tuple[str, ...]:
    """``--cases a,b`` in the benchmark's own order; an unknown name is an error."""
    if not text:
        return CASES
    asked = {c.strip() for c in text.split(",") if c.strip()}
    unknown = sorted(asked - set(CASES))
    if unknown or not asked:
        raise LabError(
            f"--cases: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(CASES)}"
        )
    return tuple(c for c in CASES if c in asked)


@dataclass(frozen=True)
class Bare:
    """The bare hotplug + probe times, s: under the cases' traffic (the goal's limit) and
    with none (the figure earlier runs reported)."""

    traffic: list[float]
    idle: list[float]
    pair: list[float]  # both teams' NICs at once, under traffic


def run(
    lab: VmLab, reps: int, cases: tuple[str, ...] = CASES
) -> tuple[list[Sample], Bare, dict[str, float] | None, list[BindBreakdown]]:
    """*cases* in a fixed order: ptmig and naive with the primaries, then the floor and its
    variants interleaved repetition by repetition (so a drift of the machine hits them
    alike), then the upstream guest.  The bare probes and the agent's figures come with
    ptmig, whose goals need them."""
    floors = [c for c in cases if c == "floor" or c in FLOOR_VARIANTS]
    with_primaries = [c for c in ("ptmig", "naive") if c in cases]
    total = 2 * reps * len(cases) + 4 * ("ptmig" in cases) + ("upstream" in cases)
    progress = Progress(total)
    bare: list[float] = []
    idle: list[float] = []
    pair: list[float] = []
    agent: dict[str, float] | None = None
    if "ptmig" in cases:
        progress(f"bare hotplug + probe of an e1000e, {reps} times, no traffic")
        idle = bare_hotplug_probe(lab, reps, under_traffic=False)
    start_tcp_sink(lab)
    if "ptmig" in cases:
        progress(f"bare hotplug + probe of an e1000e, {reps} times, under the cases' traffic")
        bare = bare_hotplug_probe(lab, reps, under_traffic=True)
        progress(f"bare hotplug + probe of two e1000e at once, {reps} times, under traffic")
        pair = bare_hotplug_probe(lab, reps, under_traffic=True, nics=2)
    samples: list[Sample] = []
    binds: list[BindBreakdown] = []
    for name in with_primaries:
        for rep in range(reps):
            for dest in ("hostb", "hosta"):
                progress(f"{name} -> {dest}, repetition {rep + 1}/{reps}")
                if name == "ptmig":
                    samples.append(run_ptmig(lab, dest, binds))
                else:
                    samples.append(run_naive(lab, dest))
    if "ptmig" in cases:
        progress("agent: start-up and memory (bench-agent)")
        agent = agent_figures(lab)
    if floors:
        co.unplug_primaries(lab)
    for rep in range(reps):
        for case in floors:
            for dest in ("hostb", "hosta"):
                progress(f"{case} -> {dest}, repetition {rep + 1}/{reps}")
                if case == "floor":
                    samples.append(run_floor(lab, dest))
                else:
                    samples.append(run_floor_variant(lab, dest, FLOOR_VARIANTS[case]))
    if "upstream" in cases:
        progress("boot the upstream net_failover guest")
        boot_upstream(lab)
        start_tcp_sink(lab)
        for rep in range(reps):
            for dest in ("hostb", "hosta"):
                progress(f"upstream -> {dest}, repetition {rep + 1}/{reps}")
                samples.append(run_upstream(lab, dest))
    return samples, Bare(bare, idle, pair), agent, binds


def agent_figures(lab: VmLab) -> dict[str, float]:
    """The agent's start-up and idle memory, as ``ptmig-lab bench-agent`` measures them."""
    from lab import bench_agent

    figures = bench_agent.run(lab)
    return {
        "vmrss_mib": figures["memory_kb"]["VmRSS"] / 1024,
        "startup_s": figures["startup_s"]["median"],
    }


def main(*, reps: int, out_dir: Path, as_json: bool, cases: tuple[str, ...] = CASES) -> int:
    lab = VmLab()
    started_here = not lab.state.netns
    if started_here:
        print("starting the lab", file=sys.stderr, flush=True)
        lab.up()
    try:
        co.configure(lab)
        with LoadSampler(lab.state.pids.values()) as sampler:
            samples, bare, agent, binds = run(lab, reps, cases)
    finally:
        if started_here:
            lab.down()
    summary = summarize(samples, bare.traffic, agent, bare_idle=bare.idle, bare_pair=bare.pair)
    if binds:
        summary["bind_breakdown_s"] = breakdown_summary(binds)
    goal_results = goals(summary, samples)
    load = sampler.stop()
    result: dict[str, Any] = {
        "rate_pps": RATE,
        "reps": reps,
        "cases": list(cases),
        "machine_load": load.to_dict(),
        "summary": summary,
        "goals": [{**asdict(g), "verdict": g.verdict} for g in goal_results],
        "samples": [s.to_dict() for s in samples],
        "binds": [asdict(b) for b in binds],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-migration.json").write_text(json.dumps(result, indent=1))
    plot_timeline(samples, out_dir / "bench-migration.png")
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        print(format_summary(summary, goal_results))
        print(load.summary())
        print(f"\nwritten: {out_dir / 'bench-migration.json'}, {out_dir / 'bench-migration.png'}")
    return 0


def format_summary(summary: dict[str, Any], goal_results: list[Goal]) -> str:
    lines = [
        f"{'case':<8}{'team':<6}{'lost median (min-max)':>24}{'wall s':>10}"
        f"{'back on primary s':>20}"
    ]
    for case, entry in summary["cases"].items():
        for team in TEAMS:
            if team not in entry:
                continue
            t = entry[team]["total_lost"]
            back = entry.get("back_on_primary_s", {})
            lines.append(
                f"{case:<8}{team:<6}{t['median']:>10.0f} ({t['min']:.0f}-{t['max']:.0f})"
                f"{'':>6}{entry['wall_s']['median']:>10.2f}"
                f"{back.get('median', float('nan')):>20.2f}"
            )
            phases = ", ".join(
                f"{p} {v['median']:.0f}" for p, v in entry[team]["lost_by_phase"].items()
            )
            lines.append(f"{'':<14}per phase: {phases}")
        if "tcp" in entry:
            stall, retrans = entry["tcp"]["longest_stall_ms"], entry["tcp"]["retransmits"]
            lines.append(
                f"{case:<8}tcp   longest stall median {stall['median']:.0f} ms "
                f"({stall['min']:.0f}-{stall['max']:.0f}), retransmits median "
                f"{retrans['median']:.0f} ({retrans['min']:.0f}-{retrans['max']:.0f})"
            )
    for case, choice in summary.get("floor_choices", {}).items():
        ratio = choice["ratio_to_floor"]
        lines.append(
            f"{case}: {choice['what']}: lost median {choice['lost_median']:.0f}"
            + (f", {ratio:.2f}x the floor's" if ratio is not None else "")
        )
    for key, what in (
        ("bare_hotplug_probe_s", "an e1000e, under traffic"),
        ("bare_hotplug_probe_idle_s", "an e1000e, no traffic"),
        ("bare_hotplug_probe_pair_s", "two e1000e at once, under traffic"),
    ):
        bare = summary.get(key)
        if bare:
            lines.append(
                f"bare hotplug + probe of {what}: median {bare['median']:.2f} s "
                f"({bare['min']:.2f}-{bare['max']:.2f})"
            )
    breakdown = summary.get("bind_breakdown_s")
    if breakdown:
        steps = ", ".join(f"{name} {v['median']:.2f}" for name, v in breakdown.items())
        lines.append(f"a bind, median s from the attach call: {steps}")
    lines.append("")
    lines += [f"{g.figure}: {g.measured} (goal {g.goal}): {g.verdict}" for g in goal_results]
    return "\n".join(lines)
