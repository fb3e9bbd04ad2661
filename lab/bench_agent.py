"""Benchmark of the guest agent's footprint: start-up time, idle memory, first call, round trip.

The agent runs in every guest of a fleet, so its cost is paid a thousand times.  Goals
(issue 13): at most 1.0 s from start to serving (median) and at most 36 MiB resident at
idle.  Measured in the lab guest (TCG: absolute times are inflated against real hardware).

* start-up: ``systemctl restart ptmig-agent``; from the unit's start timestamp to the
  agent's "listening" log line (the gRPC socket accepts from then on), per journald.
* first call: right after each restart, a new client's first GetState over virtio-serial
  (session handshake included), then its second; the first waits for whatever the agent
  still does at start-up (its warm-up, agent-owned teams).
* memory: VmRSS and Pss of the agent's process after it has been idle for 5 s.
* round trip: GetState over virtio-serial through libvirt's channel stream, from the host.

``--baseline FILE`` (a former ``--json`` output) prints both runs side by side.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lab.load import LoadSampler
from lab.vmlab import LabError, VmLab

RESTARTS = 5
CALLS = 20
GOAL_STARTUP_S = 1.0
GOAL_RSS_KB = 36 * 1024

START_PROBE = r"""
systemctl restart ptmig-agent
pid=$(systemctl show -p MainPID --value ptmig-agent)
t0=$(systemctl show -p ExecMainStartTimestampMonotonic --value ptmig-agent)
for i in $(seq 300); do
  line=$(journalctl _PID=$pid -o short-monotonic --no-pager | grep 'listening on' | head -n 1)
  [ -n "$line" ] && break
  sleep 0.1
done
echo "start_us=$t0 listening=$(echo "$line" | sed -E 's/^\[ *([0-9.]+)\].*/\1/')"
"""


def _startup_seconds(lab: VmLab) -> float:
    out = lab.exec(START_PROBE, timeout=120).check()
    fields = dict(part.split("=", 1) for part in out.split() if "=" in part)
    start_us, listening = fields.get("start_us"), fields.get("listening")
    if not start_us or not listening:
        raise LabError(f"no start-up figures from the guest: {out!r}")
    return float(listening) - int(start_us) / 1e6


def _memory_kb(lab: VmLab) -> dict[str, int]:
    out = lab.exec(
        "sleep 5; pid=$(systemctl show -p MainPID --value ptmig-agent); "
        "grep -E '^(VmRSS|Pss):' /proc/$pid/status /proc/$pid/smaps_rollup "
        "| awk '{print $1, $2}'",
        timeout=60,
    ).check()
    values: dict[str, int] = {}
    for line in out.splitlines():
        key, value = line.rsplit(" ", 1)
        values[key.split(":")[-2] if ":" in key else key] = int(value)
    return values


def client_factory(lab: VmLab) -> tuple[Callable[[], Any], Callable[[], None]]:
    """New AgentClients over the guest's channel, and the close of their connection."""
    from ptmig.serial_session import AGENT_CHANNEL

    from host.agent_client import AgentClient, AgentEndpoint
    from host.hypervisor import Hypervisor
    from lab.guest import DOMAIN_NAME

    hv = Hypervisor(lab.hosts[lab.where()].uri)
    dom = hv.domain(DOMAIN_NAME)

    def new() -> Any:
        return AgentClient(AgentEndpoint(serial=lambda: dom.open_channel(AGENT_CHANNEL)))

    return new, hv.close


def _timed(call: Callable[[], Any]) -> float:
    t0 = time.monotonic()
    call()
    return time.monotonic() - t0


def _restarts(lab: VmLab) -> tuple[list[float], list[float], list[float]]:
    """Per restart: start to serving, then a new client's first and second GetState."""
    new_client, close = client_factory(lab)
    starts, firsts, seconds = [], [], []
    try:
        for _ in range(RESTARTS):
            starts.append(_startup_seconds(lab))
            client = new_client()
            try:
                firsts.append(_timed(client.state))
                seconds.append(_timed(client.state))
            finally:
                client.close()
    finally:
        close()
    return starts, firsts, seconds


def _round_trips(lab: VmLab) -> list[float]:
    new_client, close = client_factory(lab)
    client = new_client()
    try:
        client.state()  # the first call opens the session
        return [_timed(client.state) for _ in range(CALLS)]
    finally:
        client.close()
        close()


def _spread(values: list[float], scale: float = 1.0) -> dict[str, Any]:
    return {
        "median": statistics.median(values) * scale,
        "min": min(values) * scale,
        "max": max(values) * scale,
        "runs": [v * scale for v in values],
    }


def run(lab: VmLab) -> dict[str, Any]:
    starts, firsts, seconds = _restarts(lab)
    memory = _memory_kb(lab)
    rtts = _round_trips(lab)
    version = lab.exec("dpkg-query -W -f '${Version}' ptmig-agent; echo").output.strip()
    return {
        "agent_package": version,
        "startup_s": _spread(starts),
        "first_call_ms": _spread(firsts, 1000),
        "second_call_ms": _spread(seconds, 1000),
        "memory_kb": memory,
        "get_state_rtt_ms": _spread(rtts, 1000),
        "goals": {
            "startup_at_most_1s": statistics.median(starts) <= GOAL_STARTUP_S,
            "rss_at_most_36MiB": memory.get("VmRSS", 0) <= GOAL_RSS_KB,
        },
    }


def _lines(result: dict[str, Any]) -> list[str]:
    s, m = result["startup_s"], result["memory_kb"]
    f, r = result["first_call_ms"], result["get_state_rtt_ms"]
    return [
        f"start to serving: median {s['median']:.2f} s (min {s['min']:.2f}, "
        f"max {s['max']:.2f}, {len(s['runs'])} restarts)",
        f"first GetState after a restart (new session): median {f['median']:.0f} ms "
        f"(min {f['min']:.0f}, max {f['max']:.0f}); the second: "
        f"{result['second_call_ms']['median']:.0f} ms",
        f"idle memory: VmRSS {m.get('VmRSS', 0) / 1024:.1f} MiB, "
        f"Pss {m.get('Pss', 0) / 1024:.1f} MiB",
        f"GetState round trip over virtio-serial: median {r['median']:.1f} ms "
        f"(min {r['min']:.1f}, max {r['max']:.1f})",
        "goals: "
        + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["goals"].items()),
    ]


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Two runs side by side (the figures an older run lacks are shown as -)."""

    def get(result: dict[str, Any], path: tuple[str, ...]) -> float | None:
        value: Any = result
        for key in path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value)

    rows = [
        ("start to serving, median (s)", ("startup_s", "median"), 1.0, "{:.2f}"),
        ("first GetState after start, median (ms)", ("first_call_ms", "median"), 1.0, "{:.0f}"),
        ("idle VmRSS (MiB)", ("memory_kb", "VmRSS"), 1 / 1024, "{:.1f}"),
        ("idle Pss (MiB)", ("memory_kb", "Pss"), 1 / 1024, "{:.1f}"),
        ("GetState round trip, median (ms)", ("get_state_rtt_ms", "median"), 1.0, "{:.1f}"),
    ]
    out = [f"{'':42}{'before':>10}{'after':>10}"]
    for label, path, scale, fmt in rows:
        cells = []
        for result in (before, after):
            value = get(result, path)
            cells.append("-" if value is None else fmt.format(value * scale))
        out.append(f"{label:42}{cells[0]:>10}{cells[1]:>10}")
    return "\n".join(out)


def main(*, as_json: bool, baseline: Path | None = None) -> int:
    lab = VmLab()
    if not lab.state.netns:
        raise LabError("the lab is not up: run 'ptmig-lab up' first")
    with LoadSampler(lab.state.pids.values()) as sampler:
        result = run(lab)
    load = sampler.stop()
    result["machine_load"] = load.to_dict()
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        print("\n".join(_lines(result)))
        print(load.summary())
    if baseline is not None:
        print(compare(json.loads(baseline.read_text()), result))
    return 0
