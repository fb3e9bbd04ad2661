"""Drive the lab guest's agent with the calls of many migrations, and watch its memory.

Each round is what one migration asks of the agent, over its real transport (a new
virtio-serial session through libvirt's channel, as every migration's client opens):
GetState, then per team UseStandby (releasing the primary) and BindPrimary of that same
device, then GetState.  With ``--refused`` a round is GetState, a UseStandby and a
BindPrimary the agent refuses (a team it does not have: NOT_FOUND, recorded under its
operation id as a failed step's outcome is), then GetState.  No migration happens, so
hundreds of rounds take minutes.  Every ``--every`` rounds the agent's VmRSS, Pss, fds
and threads are sampled; with ``--trace`` the agent runs with PTMIG_AGENT_TRACEMALLOC (a
systemd drop-in under /run, gone at the guest's next boot) and logs the Python
allocations that grew between the first and the last sample (its SIGUSR2), which are
returned too.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from typing import Any

from host.agent_client import AgentError, new_operation_id
from lab.bench_agent import client_factory
from lab.vmlab import LabError, VmLab

DROP_IN = "/run/systemd/system/ptmig-agent.service.d/50-tracemalloc.conf"

SAMPLE = (
    "pid=$(systemctl show -p MainPID --value ptmig-agent); "
    "echo pid $pid; grep -E '^(VmRSS|Threads):' /proc/$pid/status; "
    "grep -E '^(Pss|Private_Dirty|Anonymous):' /proc/$pid/smaps_rollup; "
    "echo fds $(ls /proc/$pid/fd | wc -l)"
)


def parse_sample(text: str) -> dict[str, int]:
    """SAMPLE's output ("VmRSS:  38000 kB", "fds 16", ...) as {"VmRSS": 38000, "fds": 16}."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, value = line.replace(":", " ").split()[:2]
        values[key] = int(value)
    return values


def _sample(lab: VmLab) -> dict[str, int]:
    return parse_sample(lab.exec(SAMPLE, timeout=60).check())


def _restart_agent(lab: VmLab, trace_frames: int) -> None:
    if trace_frames:
        setup = (
            f"mkdir -p {DROP_IN.rsplit('/', 1)[0]} && printf '[Service]\\n"
            f"Environment=PTMIG_AGENT_TRACEMALLOC={trace_frames}\\n' > {DROP_IN}"
        )
    else:
        setup = f"rm -f {DROP_IN}"
    lab.exec(f"{setup}; systemctl daemon-reload; systemctl restart ptmig-agent", 120).check()
    time.sleep(15 if trace_frames else 5)  # past the warm-up (slower while tracing)


def _round(client: Any, refused: bool) -> None:
    state = client.state()
    if refused:
        with contextlib.suppress(AgentError):  # NOT_FOUND
            client.use_standby(
                "no-such-team", release_primary=True, operation_id=new_operation_id()
            )
        with contextlib.suppress(AgentError):
            client.bind_primary("no-such-team", operation_id=new_operation_id())
    else:
        pci = {link.name: link.pci_address for link in state.links}
        for team in state.teams:
            if not team.primary:
                raise LabError(f"team {team.name} has no primary: {team}")
            device = pci[team.primary]
            client.use_standby(team.name, release_primary=True, operation_id=new_operation_id())
            client.bind_primary(team.name, operation_id=new_operation_id(), pci_address=device)
    client.state()


def _on_primaries(new_client: Any) -> bool:
    client = new_client()
    try:
        return all(team.primary for team in client.state().teams)
    finally:
        client.close()


def run(
    lab: VmLab, rounds: int, every: int, refused: bool = False, trace_frames: int = 0
) -> dict[str, Any]:
    new_client, close = client_factory(lab)
    if not refused and not _on_primaries(new_client):
        from lab.coordinated import configure

        configure(lab)  # ptmig's pools and teams, every team plugged and bound
    _restart_agent(lab, trace_frames)
    samples = [{"round": 0, **_sample(lab)}]
    print(json.dumps(samples[0]), file=sys.stderr, flush=True)
    if trace_frames:
        lab.exec("systemctl kill -s USR2 ptmig-agent").check()  # the baseline snapshot
    started = time.monotonic()
    try:
        for number in range(1, rounds + 1):
            client = new_client()
            try:
                _round(client, refused)
            finally:
                client.close()
            if number % every == 0 or number == rounds:
                samples.append({"round": number, **_sample(lab)})
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)  # as it goes
    finally:
        close()
    result: dict[str, Any] = {
        "rounds": rounds,
        "rounds_of_refused_calls": refused,
        "seconds": round(time.monotonic() - started, 1),
        "agent_package": lab.exec("dpkg-query -W -f '${Version}' ptmig-agent").output.strip(),
        "samples": samples,
        "growth_kb": samples[-1]["VmRSS"] - samples[0]["VmRSS"],
    }
    if trace_frames:
        since = lab.exec("date +%s").check().strip()
        lab.exec("systemctl kill -s USR2 ptmig-agent").check()
        time.sleep(3)
        result["tracemalloc"] = lab.exec(
            f"journalctl -u ptmig-agent --since @{since} -o cat --no-pager | grep -A60 tracemalloc"
        ).output.splitlines()
    return result


def main(rounds: int, every: int, refused: bool, trace_frames: int, as_json: bool) -> int:
    lab = VmLab()
    if not lab.state.netns:
        raise LabError("the lab is not up: run 'ptmig-lab up' first")
    result = run(lab, rounds, every, refused, trace_frames)
    if as_json:
        print(json.dumps(result, indent=1))
    else:
        for sample in result["samples"]:
            print(
                f"round {sample['round']:4}: VmRSS {sample['VmRSS']} kB, Pss {sample['Pss']} kB, "
                f"fds {sample['fds']}, threads {sample['Threads']}"
            )
        print(f"growth {result['growth_kb']} kB over {rounds} rounds in {result['seconds']} s")
        for line in result.get("tracemalloc", []):
            print(line)
    return 0
