"""``ptmig-lab bench-vfio``: the nested lab's passthrough figures, in one run.

Under one echo rate per team (the highest the nested guest answers without loss when
nothing moves, searched first), three cases move the same L2 guest there and back:

* ``plain``: both teams on their virtio standbys, no passthrough device plugged, libvirt's
  own p2p migration: the floor the other two are measured against;
* ``whole-nic``: ``ptmig migrate`` with team wan alone, its whole e1000e on vfio-pci;
* ``vf+whole-nic``: ``ptmig migrate`` with team lan on an igb VF beside team wan;

and, with both teams on their standbys, a bare hot-plug of each kind of device by libvirt
alone (no agent, no bind): what the plug itself costs the guest's traffic.

For each ptmig move: the report's phases, the loss per phase and team, and, from the
guest's own ``ip monitor link`` record, when each team's new device appeared in the guest
and when it had carrier, on L0's clock (L2's offset measured over the consoles, its error
bound reported).  Results print as a table and, with ``--out``, as JSON.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import libvirt

from host.domain.devices import pci_hostdev_xml, vf_interface_xml
from host.domain.pools import pool_network_name
from lab import GUEST_IP, WAN_GUEST_IP
from lab.guest import DOMAIN_NAME
from lab.migration import libvirt_migrate
from lab.nested import coordinated as co
from lab.nested.vlab import L1Pinger, VfioLab, VfioLabError, peer_uri
from lab.traffic import Phase

log = logging.getLogger(__name__)

OTHER = {"hosta": "hostb", "hostb": "hosta"}
TEAM_IPS = {"lan": GUEST_IP, "wan": WAN_GUEST_IP}
BONDS = {"lan": "bond0", "wan": "bond1"}
RATES = (100, 200, 500, 1000)
IDLE_S = 20.0
LINK_LOG = "/run/ptmig-bench-links.log"
_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)\]")


@dataclass
class Move:
    """One migration of a case under ping."""

    case: str
    source: str
    destination: str
    exit_code: int
    wall_s: float
    phases: dict[str, float] = field(default_factory=dict)  # ptmig's report; plain: migrate
    downtime_ms: float | None = None
    lost: dict[str, dict[str, int]] = field(default_factory=dict)  # team -> phase -> lost
    #: team -> seconds from the bind phase's start to the device appearing / having
    #: carrier in the guest, and to the team back on it (the bind phase's end)
    plug: dict[str, dict[str, float]] = field(default_factory=dict)
    #: team -> outages (start, end in seconds from the bind's or plug's start; lost)
    outages: dict[str, list[tuple[float, float, int]]] = field(default_factory=dict)


@dataclass
class BenchResult:
    qemu: str
    rate: int
    idle: dict[int, dict[str, int]]  # rate -> team -> lost in IDLE_S with nothing moving
    clock_error_s: float
    moves: list[Move]


def pinging(lab: VfioLab, name: str, rate: int) -> dict[str, L1Pinger]:
    """A pinger per team, started, and 2 s of its traffic before anything moves."""
    pingers = {t: L1Pinger(lab, ip, f"{name}{t}", rate) for t, ip in TEAM_IPS.items()}
    for p in pingers.values():
        p.start()
    time.sleep(2)
    return pingers


def idle_loss(lab: VfioLab, rate: int, seconds: float = IDLE_S) -> dict[str, int]:
    pingers = {t: L1Pinger(lab, ip, f"idle{rate}-{t}", rate) for t, ip in TEAM_IPS.items()}
    for p in pingers.values():
        p.start()
    time.sleep(seconds)
    return {t: int(p.stop_and_analyze([])["lost"]) for t, p in pingers.items()}


def guest_clock_offset(lab: VfioLab) -> tuple[float, float]:
    """L2's clock minus L0's, and its error bound: L2 read from L1 over L2's console
    (``lab.nested.inside clock``), L1 from L0 over L1's."""
    out = lab.inside("clock", lab.where(), timeout=120).check()
    l2_minus_l1, err2 = (float(x) for x in out.strip().splitlines()[-1].split())
    l1_minus_l0, err1 = lab.l1_clock_offset()
    return l2_minus_l1 + l1_minus_l0, err1 + err2


def link_events(lab: VfioLab, since: float, offset: float) -> list[tuple[float, str]]:
    """``ip monitor link`` lines the guest logged after *since* (L0 epoch), on L0's clock."""
    text = lab.exec(f"cat {LINK_LOG}", timeout=120).check()
    out = []
    for line in text.splitlines():
        m = _STAMP.match(line)
        if m:
            t = datetime.fromisoformat(m.group(1)).timestamp() - offset
            if t >= since:
                out.append((t, line[m.end() :]))
    return out


def plug_times(
    lab: VfioLab, teams: list[str], bind: tuple[float, float], offset: float
) -> dict[str, dict[str, float]]:
    """Per team: seconds from the bind phase's start until its new active member appeared
    in the guest, had carrier, and the bind phase ended."""
    start, end = bind
    events = link_events(lab, start - 1, offset)
    out: dict[str, dict[str, float]] = {}
    for team in teams:
        dev = lab.exec(f"cat /sys/class/net/{BONDS[team]}/bonding/active_slave").check().strip()
        mine = [(t, text) for t, text in events if re.search(rf"\b{re.escape(dev)}[:@ ]", text)]
        appeared = next((t for t, _ in mine), None)
        carrier = next(
            (t for t, text in mine if "LOWER_UP" in text and "NO-CARRIER" not in text), None
        )
        out[team] = {
            "appeared_s": round(appeared - start, 2) if appeared else -1.0,
            "carrier_s": round(carrier - start, 2) if carrier else -1.0,
            "on_primary_s": round(end - start, 2),
        }
    return out


def ptmig_move(lab: VfioLab, case: str, teams: list[str], rate: int, offset: float) -> Move:
    src = lab.where()
    dest = OTHER[src]
    pingers = pinging(lab, f"{case}-{src}-", rate)
    t0 = time.monotonic()
    moved = co.migrate(lab, dest)
    wall = time.monotonic() - t0
    time.sleep(2)
    code, spans = moved.exit_code, moved.phases
    move = Move(case, src, dest, code, round(wall, 2))
    move.phases = {p.name: p.seconds for p in moved.report.phases}
    move.downtime_ms = moved.downtime_ms
    bind = next(((p.start, p.end) for p in spans if p.name == "bind"), None)
    for team, p in pingers.items():
        traffic = p.stop_and_analyze(spans)
        move.lost[team] = {ph["name"]: ph["lost"] for ph in traffic["phases"]}
        if bind:
            move.outages[team] = outages_from(traffic, bind[0], "bind")
    if bind and code == 0:
        move.plug = plug_times(lab, teams, bind, offset)
    return move


def outages_from(
    traffic: dict[str, Any], origin: float, phase: str
) -> list[tuple[float, float, int]]:
    """The outages of *phase*, in seconds from *origin* (L0 epoch); the analysis has them
    on L1's clock, shifted back by the offset the pinger measured."""
    shift = traffic.get("clock_offset_s", 0.0)
    return [
        (
            round(o["start_ns"] / 1e9 - shift - origin, 2),
            round(o["end_ns"] / 1e9 - shift - origin, 2),
            o["lost"],
        )
        for o in traffic["outages"]
        if o["phase"] == phase
    ]


def bare_plug(lab: VfioLab, kind: str, rate: int, offset: float, settle: float = 15.0) -> Move:
    """Attach one device with libvirt alone while both teams run on their standbys, under
    ping; detach it again.  No agent call: what the guest loses is the plug's own cost."""
    on = lab.where()
    dev = lab.state.hosts[on]
    alias = f"ua-bench-{kind}"
    if kind == "whole-nic":
        xml = pci_hostdev_xml(alias=alias, pci_address=dev.whole_pci)
    else:  # what ptmig plugs: an interface on the pool's hostdev network, the team's MAC
        network = pool_network_name(co.VF_POOL)
        xml = vf_interface_xml(alias=alias, network=network, mac="52:54:00:aa:00:01")
    before = set(lab.exec("ls /sys/class/net").check().split())
    pingers = pinging(lab, f"bare-{kind}-", rate)
    started = time.time()
    lab.domain(on).attachDeviceFlags(xml, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    called = time.time() - started
    time.sleep(max(0.0, settle - called))
    spans = [Phase("plug", started, started + settle)]
    move = Move(f"bare-{kind}", on, on, 0, round(called, 2), {"attach_call": round(called, 2)})
    for team, p in pingers.items():
        traffic = p.stop_and_analyze(spans)
        move.lost[team] = {ph["name"]: ph["lost"] for ph in traffic["phases"]}
        move.outages[team] = outages_from(traffic, started, "plug")
    events = link_events(lab, started - 1, offset)
    new = [(t, text) for t, text in events if _ifname(text) not in before]
    appeared = new[0][0] - started if new else -1.0
    # nothing brings the new link up (no agent call), so it has no carrier to wait for
    carrier = next(
        (t - started for t, text in new if "LOWER_UP" in text and "NO-CARRIER" not in text), -1.0
    )
    move.plug = {kind: {"appeared_s": round(appeared, 2), "carrier_s": round(carrier, 2)}}
    lab.detach(on, alias)
    return move


def _ifname(monitor_line: str) -> str:
    """The link an ``ip -o monitor link`` line is about ("3: eth2@NONE: <...>" -> eth2)."""
    m = re.match(r"\s*\d+: ([^:@ ]+)", monitor_line)
    return m.group(1) if m else ""


def plain_move(lab: VfioLab, rate: int) -> Move:
    """libvirt's own migration of the guest with no passthrough device plugged."""
    src = lab.where()
    dest = OTHER[src]
    pingers = pinging(lab, f"plain-{src}-", rate)
    moved = libvirt_migrate(lab.domain(src), lab.conn(dest), peer_uri(dest))
    time.sleep(2)
    wall = moved.wall_s
    move = Move("plain", src, dest, 0, round(wall, 2), {"migrate": round(wall, 3)})
    move.downtime_ms = moved.downtime_ms
    for team, p in pingers.items():
        analyzed = p.stop_and_analyze(moved.phases)
        move.lost[team] = {ph["name"]: ph["lost"] for ph in analyzed["phases"]}
    return move


def unplug_all(lab: VfioLab) -> None:
    """Both teams on their standbys and their devices detached, records cleared."""
    on = lab.where()
    co.ptmig_json(on, "failover", DOMAIN_NAME, "--to", "standby")
    for team in co.ptmig_json(on, "team-show", DOMAIN_NAME)["teams"]:
        if team["primary"]:
            lab.detach(on, team["primary"]["alias"])


def run(lab: VfioLab, rates: tuple[int, ...]) -> BenchResult:
    co.define_pools(lab)
    co.team_set(lab, "wan", "preserve")
    co.team_set(lab, "lan", "preserve")
    co.to_primary(lab, timeout=300)
    idle: dict[int, dict[str, int]] = {}
    rate = 0
    for candidate in rates:
        idle[candidate] = idle_loss(lab, candidate)
        log.info("idle at %d/s: lost %s", candidate, idle[candidate])
        if any(idle[candidate].values()):
            break
        rate = candidate
    if not rate:
        raise VfioLabError(f"the guest loses echo requests at every rate, idle: {idle}")
    lab.exec(f"(ip -ts -o monitor link > {LINK_LOG} 2>&1 &)").check()
    offset, error = guest_clock_offset(lab)
    moves = [ptmig_move(lab, "vf+whole-nic", ["lan", "wan"], rate, offset) for _ in range(2)]
    # team wan alone: lan's VF out of the domain and lan out of the record
    unplug_all(lab)
    co.ptmig(lab.where(), "team-remove", DOMAIN_NAME, "lan")
    co.to_primary(lab, timeout=300)
    moves += [ptmig_move(lab, "whole-nic", ["wan"], rate, offset) for _ in range(2)]
    unplug_all(lab)
    moves += [plain_move(lab, rate) for _ in range(2)]
    moves += [bare_plug(lab, kind, rate, offset) for kind in ("whole-nic", "vf")]
    co.team_set(lab, "lan", "preserve")
    co.to_primary(lab, timeout=300)
    return BenchResult(lab.state.qemu, rate, idle, round(error, 3), moves)


def table(result: BenchResult) -> str:
    lines = [
        f"L0 QEMU {result.qemu}; {result.rate} echo requests/s per team (idle loss per "
        f"rate in {IDLE_S:.0f} s: {result.idle}); guest clock error +-{result.clock_error_s} s",
        f"{'case':<13} {'move':<13} {'exit':>4} {'wall':>6} {'unplug':>6} {'migrate':>7} "
        f"{'downtime':>8} {'bind':>6}  lost per phase and team; plug: appeared/carrier/back (s)",
    ]
    for m in result.moves:
        lost = "; ".join(
            f"{t} " + " ".join(f"{ph}={n}" for ph, n in phases.items() if n)
            for t, phases in m.lost.items()
        )
        plug = "; ".join(
            f"{t} {p['appeared_s']}/{p['carrier_s']}/{p.get('on_primary_s', '-')}"
            for t, p in m.plug.items()
        )
        lines.append(
            f"{m.case:<13} {m.source + '->' + m.destination:<13} {m.exit_code:>4} "
            f"{m.wall_s:>6.1f} {m.phases.get('unplug', 0):>6.2f} "
            f"{m.phases.get('migrate', 0):>7.2f} {m.downtime_ms or 0:>8.0f} "
            f"{m.phases.get('bind', 0):>6.2f}  {lost or 'none'}"
            + (f"; plug {plug}" if plug else "")
        )
    return "\n".join(lines)


def load(path: Path) -> BenchResult:
    """A run's JSON (``--out``) read back, to print its table again."""
    data = json.loads(path.read_text())
    moves = [Move(**m) for m in data.pop("moves")]
    data["idle"] = {int(k): v for k, v in data["idle"].items()}
    return BenchResult(**data, moves=moves)


def main(rates: tuple[int, ...] = RATES, out: Path | None = None, as_json: bool = False) -> int:
    lab = VfioLab()
    try:
        lab.up()
        result = run(lab, rates)
    finally:
        lab.down()
    data: dict[str, Any] = asdict(result)
    if out is not None:
        out.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(data, indent=1) if as_json else table(result))
    return 0
