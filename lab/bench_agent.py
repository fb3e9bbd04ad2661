"""Benchmark of the guest agent's footprint: start-up time, idle memory, call round trip.

The agent runs in every guest of a fleet, so its cost is paid a thousand times.  Goals
(issue 3): under 1 s from start to serving and under 35 MB resident at idle.  Measured in
the lab guest (TCG: absolute times are inflated against real hardware).

* start-up: ``systemctl restart ptmig-agent``; from the unit's start timestamp to the
  agent's "listening" log line (the gRPC socket accepts from then on), per journald.
* memory: VmRSS and Pss of the agent's process after it has been idle for 5 s.
* round trip: GetState over virtio-serial through libvirt's channel stream, from the host.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import Any

from lab.vmlab import LabError, VmLab

RESTARTS = 5
CALLS = 20

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


def _round_trips(lab: VmLab) -> list[float]:
    from ptmig.serial_session import AGENT_CHANNEL

    from host.agent_client import AgentClient, AgentEndpoint
    from host.hypervisor import Hypervisor
    from lab.guest import DOMAIN_NAME

    with Hypervisor(lab.hosts[lab.where()].uri) as hv:
        dom = hv.domain(DOMAIN_NAME)
        client = AgentClient(AgentEndpoint(serial=lambda: dom.open_channel(AGENT_CHANNEL)))
        try:
            client.state()  # the first call opens the session
            times = []
            for _ in range(CALLS):
                t0 = time.monotonic()
                client.state()
                times.append(time.monotonic() - t0)
            return times
        finally:
            client.close()


def run(lab: VmLab) -> dict[str, Any]:
    starts = [_startup_seconds(lab) for _ in range(RESTARTS)]
    memory = _memory_kb(lab)
    rtts = _round_trips(lab)
    return {
        "startup_s": {
            "median": statistics.median(starts),
            "min": min(starts),
            "max": max(starts),
            "runs": starts,
        },
        "memory_kb": memory,
        "get_state_rtt_ms": {
            "median": statistics.median(rtts) * 1000,
            "min": min(rtts) * 1000,
            "max": max(rtts) * 1000,
        },
        "goals": {
            "startup_under_1s": statistics.median(starts) < 1.0,
            "rss_under_35MB": memory.get("VmRSS", 0) < 35 * 1024,
        },
    }


def main(*, as_json: bool) -> int:
    lab = VmLab()
    if not lab.state.netns:
        raise LabError("the lab is not up: run 'ptmig-lab up' first")
    result = run(lab)
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        s, m, r = result["startup_s"], result["memory_kb"], result["get_state_rtt_ms"]
        print(
            f"start to serving: median {s['median']:.2f} s (min {s['min']:.2f}, "
            f"max {s['max']:.2f}, {len(s['runs'])} restarts)"
        )
        print(
            f"idle memory: VmRSS {m.get('VmRSS', 0) / 1024:.1f} MiB, "
            f"Pss {m.get('Pss', 0) / 1024:.1f} MiB"
        )
        print(
            f"GetState round trip over virtio-serial: median {r['median']:.1f} ms "
            f"(min {r['min']:.1f}, max {r['max']:.1f})"
        )
        print(
            "goals: "
            + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in result["goals"].items())
        )
    return 0
