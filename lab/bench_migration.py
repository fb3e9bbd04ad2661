"""Downtime benchmark: what a guest's traffic loses when it migrates, by approach.

Cases, each a round trip hosta -> hostb -> hosta of the same lab guest, repeated:

* floor: plain libvirt live migration with the guest on its virtio NICs only;
* naive: hot-unplug the *active* e1000e stand-ins with no switch first, migrate with
  libvirt, then plug a device from the destination's pool and bind it (what a management
  layer without a guest agent does, helped by our agent for the rebind);
* ptmig: ``ptmig migrate``; team lan shows MAC policy preserve, team wan follow;
* upstream: the same guest booted as a QEMU virtio-net failover pair (libvirt
  ``<teaming>`` + ``failover_pair_id``) with Linux net_failover instead of a bond, migrated
  by libvirt; only team lan's pair exists there.

The client sends 1000 packets/s to each team's address for the whole run; losses are
counted per phase from the send times (lab.traffic).  Also measured: the bare time from
attaching an e1000e to the guest seeing it with carrier (hotplug + driver probe), the
limit for "back on the passthrough device".
"""

from __future__ import annotations

import contextlib
import json
import shlex
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lab import GUEST_IP, WAN_GUEST_IP
from lab import coordinated as co
from lab.fabric import CLIENT_NS
from lab.guest import DOMAIN_NAME, Nic
from lab.paths import run_dir
from lab.traffic import FixedRatePinger, Phase, PingRecord, analyze
from lab.vmlab import LabError, VmLab

RATE = 1000.0
SETTLE_S = 1.5
TEAMS = {"lan": GUEST_IP, "wan": WAN_GUEST_IP}


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
    records: dict[str, PingRecord] = field(default_factory=dict, repr=False)

    def total_lost(self, team: str) -> int:
        return sum(v for k, v in self.lost[team].items())

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
        }


def _pingers(name: str, teams: tuple[str, ...]) -> dict[str, FixedRatePinger]:
    return {
        team: FixedRatePinger(
            TEAMS[team],
            run_dir() / f"bench-{name}-{team}.ping",
            rate=RATE,
            prefix=["ip", "netns", "exec", CLIENT_NS],
        )
        for team in teams
    }


class Recorder:
    """Pingers around a migration, with phase marks."""

    def __init__(self, name: str, teams: tuple[str, ...] = tuple(TEAMS)) -> None:
        self.pingers = _pingers(name, teams)
        self.phases: list[Phase] = []

    def __enter__(self) -> Recorder:
        for p in self.pingers.values():
            p.start()
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
        return Sample(case, route, self.phases, lost, longest, wall_s, records=records, **extra)

    def __exit__(self, *exc: object) -> None:
        """On an error, stop the senders that finish() did not (stop() is idempotent)."""
        for p in self.pingers.values():
            with contextlib.suppress(Exception):
                p.stop()


def _primary_aliases(lab: VmLab) -> list[str]:
    status = co.ptmig_json(lab, lab.where(), "status", DOMAIN_NAME)
    return [t["primary"]["alias"] for t in status["teams"] if t["primary"]]


def run_ptmig(lab: VmLab, dest: str) -> Sample:
    src = lab.where()
    with Recorder(f"ptmig-{dest}") as rec:
        proc = co.ptmig(
            lab,
            src,
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
            raise LabError(f"ptmig migrate: {proc.stderr.strip()}")
        report = json.loads(proc.stdout)
        for p in report["phases"]:
            rec.phase(p["name"], p["started_at"], p["started_at"] + p["seconds"])
        bind = next(p for p in report["phases"] if p["name"] == "bind")
        sample = rec.finish(
            "ptmig",
            f"{src}->{dest}",
            sum(p["seconds"] for p in report["phases"]),
            back_on_primary_s=bind["seconds"],
            downtime_ms=report["migration"].get("downtime_ms"),
        )
    if report["outcome"] != "done":
        raise LabError(f"ptmig migrate ended {report['outcome']}: {report['error']}")
    lab.check_health()
    return sample


def run_naive(lab: VmLab, dest: str) -> Sample:
    src = lab.where()
    with Recorder(f"naive-{dest}") as rec:
        t0 = time.time()
        for alias in _primary_aliases(lab):
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
    with Recorder(f"floor-{dest}") as rec:
        t0 = time.time()
        result = lab.migrate(dest)
        t1 = time.time()
        rec.phase("migrate", t0, t1)
        sample = rec.finish("floor", f"{src}->{dest}", t1 - t0, downtime_ms=result.downtime_ms)
    lab.check_health()
    return sample


UPSTREAM_POST_S = 6.0  # net_failover's outage comes ~2.5 s after the primary is back


def run_upstream(lab: VmLab, dest: str) -> Sample:
    """The failover guest: libvirt migrates, QEMU unplugs and replugs the primary itself."""
    src = lab.where()
    with Recorder(f"upstream-{dest}", teams=("lan",)) as rec:
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
    from lab.demo import wait_reachable
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


def bare_hotplug_probe(lab: VmLab, reps: int) -> list[float]:
    """Attach an e1000e and time it until the guest has it with carrier; then unplug."""
    out = []
    for i in range(reps):
        nic = Nic(f"52:54:00:ee:00:{i + 1:02x}", f"ptv-probe{i}", f"ua-probe{i}")
        # The device must be up to have carrier: bring it up as soon as it is there (what
        # any binding must do too), then wait for carrier.
        script = (
            f"for n in $(seq 3000); do for d in /sys/class/net/*; do "
            f'if [ "$(cat $d/address 2>/dev/null)" = {nic.mac} ]; then '
            f"ip link set dev ${{d##*/}} up 2>/dev/null; "
            f'[ "$(cat $d/carrier 2>/dev/null)" = 1 ] && exit 0; fi; done; '
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
        lab.attach_nic(nic)
        thread.join()
        if "error" in done:
            raise LabError(f"probe NIC {nic.mac}: {done['error']}")
        if done["result"].status != 0:
            raise LabError(f"probe NIC {nic.mac} never came up with carrier")
        out.append(done["t"] - t0)
        lab.detach_nic(nic.alias)
    return out


def _stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(samples: list[Sample], bare: list[float]) -> dict[str, Any]:
    """Median and spread per case and team, and the goals checked against them."""
    out: dict[str, Any] = {"cases": {}, "bare_hotplug_probe_s": _stats(bare)}
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
        out["cases"][case] = entry
    return out


def goals(summary: dict[str, Any]) -> dict[str, str]:
    """The issue's goals, each 'met' / 'not met' with the numbers that decide it."""
    cases = summary["cases"]
    res: dict[str, str] = {}

    def med(case: str, *path: str) -> float | None:
        node: Any = cases.get(case)
        for key in path:
            if node is None:
                return None
            node = node.get(key)
        return None if node is None else float(node["median"])

    for team in TEAMS:
        p, f, n, u = (med(c, team, "total_lost") for c in ("ptmig", "floor", "naive", "upstream"))
        if p is not None and f is not None:
            noise = max(10.0, 0.1 * f)
            res[f"{team}: ptmig loses no more than the floor (+{noise:.0f} noise)"] = (
                f"{'met' if p <= f + noise else 'not met'} ({p:.0f} vs {f:.0f})"
            )
        if p is not None and n is not None:
            res[f"{team}: ptmig loses fewer than naive"] = (
                f"{'met' if p < n else 'not met'} ({p:.0f} vs {n:.0f})"
            )
        if p is not None and u is not None:
            res[f"{team}: ptmig loses no more than upstream net_failover"] = (
                f"{'met' if p <= u else 'not met'} ({p:.0f} vs {u:.0f})"
            )
    back, bare = med("ptmig", "back_on_primary_s"), summary["bare_hotplug_probe_s"]
    if back is not None and bare:
        res["back on primary within 1.2x of bare hotplug+probe"] = (
            f"{'met' if back <= 1.2 * bare['median'] else 'not met'} "
            f"({back:.2f} s vs {bare['median']:.2f} s)"
        )
    pw, fw = med("ptmig", "wall_s"), med("floor", "wall_s")
    if pw is not None and fw is not None:
        res["whole migration within 1.3x of the floor's wall time"] = (
            f"{'met' if pw <= 1.3 * fw else 'not met'} ({pw:.2f} s vs {fw:.2f} s)"
        )
    return res


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


def run(lab: VmLab, reps: int) -> tuple[list[Sample], list[float]]:
    bare = bare_hotplug_probe(lab, reps)
    samples: list[Sample] = []
    for _ in range(reps):
        for dest in ("hostb", "hosta"):
            samples.append(run_ptmig(lab, dest))
        for dest in ("hostb", "hosta"):
            samples.append(run_naive(lab, dest))
    co.ptmig(lab, lab.where(), "failover", DOMAIN_NAME, "--to", "standby")
    for alias in _primary_aliases(lab):
        lab.detach_nic(alias)
    for _ in range(reps):
        for dest in ("hostb", "hosta"):
            samples.append(run_floor(lab, dest))
    boot_upstream(lab)
    for _ in range(reps):
        for dest in ("hostb", "hosta"):
            samples.append(run_upstream(lab, dest))
    return samples, bare


def main(*, reps: int, out_dir: Path, as_json: bool) -> int:
    lab = VmLab()
    started_here = not lab.state.netns
    if started_here:
        lab.up()
    try:
        co.configure(lab)
        samples, bare = run(lab, reps)
    finally:
        if started_here:
            lab.down()
    summary = summarize(samples, bare)
    goal_results = goals(summary)
    result: dict[str, Any] = {
        "rate_pps": RATE,
        "reps": reps,
        "summary": summary,
        "goals": goal_results,
        "samples": [s.to_dict() for s in samples],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench-migration.json").write_text(json.dumps(result, indent=1))
    plot_timeline(samples, out_dir / "bench-migration.png")
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        print(format_summary(summary, goal_results))
        print(f"\nwritten: {out_dir / 'bench-migration.json'}, {out_dir / 'bench-migration.png'}")
    return 0


def format_summary(summary: dict[str, Any], goal_results: dict[str, str]) -> str:
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
    bare = summary["bare_hotplug_probe_s"]
    if bare:
        lines.append(
            f"bare hotplug + probe of an e1000e: median {bare['median']:.2f} s "
            f"({bare['min']:.2f}-{bare['max']:.2f})"
        )
    lines.append("")
    lines += [f"{k}: {v}" for k, v in goal_results.items()]
    return "\n".join(lines)
