"""Drive the lab guest's agent with the calls of many migrations, and watch its memory.

Each round is what one migration asks of the agent, over its real transport (a new
virtio-serial session through libvirt's channel, as every migration's client opens):
GetState, then per team UseStandby (releasing the primary) and BindPrimary of that same
device, then GetState.  With ``--refused`` a round is GetState, a UseStandby and a
BindPrimary the agent refuses (a team it does not have: NOT_FOUND, recorded under its
operation id as a failed step's outcome is), then GetState.  No migration happens, so
hundreds of rounds take minutes.  Every ``--every`` rounds the agent's VmRSS, Pss, fds
and threads are sampled; the first and the last sample also sum the resident memory of
its mappings by kind (`MAPS`), to tell malloc's main heap from its per-thread arenas and
from Python's own arenas.  With ``--trace`` the agent runs with PTMIG_AGENT_TRACEMALLOC
and logs the Python allocations that grew between the first and the last sample (its
SIGUSR2), which are returned too; with ``--malloc-arena-max`` it runs with glibc's
MALLOC_ARENA_MAX.  Both are set by a systemd drop-in under /run (gone at the guest's next
boot, and removed by a run without them).
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

DROP_IN = "/run/systemd/system/ptmig-agent.service.d/50-agent-churn.conf"
#: A first call after a restart may wait for the warm-up, which tracing slows a lot
#: under TCG: 8 frames made the agent miss a 15 s deadline.
FIRST_CALL_TIMEOUT_S = 180.0

SAMPLE = (
    "pid=$(systemctl show -p MainPID --value ptmig-agent); "
    "echo pid $pid; grep -E '^(VmRSS|Threads):' /proc/$pid/status; "
    "grep -E '^(Pss|Private_Dirty|Anonymous):' /proc/$pid/smaps_rollup; "
    "echo fds $(ls /proc/$pid/fd | wc -l)"
)


#: Each mapping of the agent with its size, resident size and name, from smaps.
MAPS = (
    "pid=$(systemctl show -p MainPID --value ptmig-agent); "
    "awk '/^[0-9a-f]+-[0-9a-f]+ /{name=$6; perms=$2} "
    "/^Size:/{size=$2} /^Rss:/{print size, $2, perms, name}' /proc/$pid/smaps"
)

#: glibc's per-thread arenas are heaps of HEAP_MAX_SIZE (64 MiB on 64-bit), mapped
#: whole and made accessible as they grow: the rw part and the ---p rest add up to it.
ARENA_HEAP_KB = 64 * 1024
#: A thread's stack: 8 MiB (the default RLIMIT_STACK) beside a guard page.
THREAD_STACK_KB = 8 * 1024


def summarise_maps(text: str) -> dict[str, int]:
    """Resident kB by kind of mapping, from MAPS's lines ("size rss perms [name]").

    "heap" is malloc's main arena (brk), "thread_arenas" glibc's per-thread arenas (an
    anonymous rw mapping whose ---p neighbour makes it up to 64 MiB), "stacks" the 8 MiB
    ones, "other_anon" the rest of the anonymous memory: Python's own arenas (1 MiB each,
    merged by the kernel when adjacent, so not told apart by size) and mallocs above
    glibc's mmap threshold; "files" everything backed by a file.
    """
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            rows.append((int(fields[0]), int(fields[1]), fields[2], " ".join(fields[3:])))
    kinds = dict.fromkeys(("heap", "thread_arenas", "stacks", "other_anon", "files"), 0)
    for number, (size, rss, perms, name) in enumerate(rows):
        if name == "[heap]":
            kind = "heap"
        elif name.startswith("/"):
            kind = "files"
        elif name:  # [stack], [vdso], ...
            kind = "other_anon"
        elif size == THREAD_STACK_KB:
            kind = "stacks"
        elif (
            perms.startswith("rw")
            and number + 1 < len(rows)
            and rows[number + 1][2].startswith("---")
            and not rows[number + 1][3]
            and size + rows[number + 1][0] == ARENA_HEAP_KB
        ) or size == ARENA_HEAP_KB:
            kind = "thread_arenas"
        else:
            kind = "other_anon"
        kinds[kind] += rss
    return kinds


def drop_in(trace_frames: int, malloc_arena_max: int) -> str | None:
    """The unit's drop-in for these settings (None: none is needed)."""
    environment = []
    if trace_frames:
        environment.append(f"PTMIG_AGENT_TRACEMALLOC={trace_frames}")
    if malloc_arena_max:
        environment.append(f"MALLOC_ARENA_MAX={malloc_arena_max}")
    if not environment:
        return None
    return "[Service]\n" + "".join(f"Environment={value}\n" for value in environment)


def parse_sample(text: str) -> dict[str, int]:
    """SAMPLE's output ("VmRSS:  38000 kB", "fds 16", ...) as {"VmRSS": 38000, "fds": 16}."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, value = line.replace(":", " ").split()[:2]
        values[key] = int(value)
    return values


def _sample(lab: VmLab, maps: bool = False) -> dict[str, int]:
    values = parse_sample(lab.exec(SAMPLE, timeout=60).check())
    if maps:
        kinds = summarise_maps(lab.exec(MAPS, timeout=60).check())
        values.update({f"rss_{kind}": kb for kind, kb in kinds.items()})
    return values


def _restart_agent(lab: VmLab, trace_frames: int, malloc_arena_max: int) -> None:
    text = drop_in(trace_frames, malloc_arena_max)
    if text is None:
        setup = f"rm -f {DROP_IN}"
    else:
        escaped = text.replace("\n", "\\n")  # one line for the guest's shell
        setup = f"mkdir -p {DROP_IN.rsplit('/', 1)[0]} && printf '{escaped}' > {DROP_IN}"
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


def _first_call(new_client: Any) -> None:
    """A GetState with a long deadline: whatever the agent still does after its restart
    is paid here, before the first sample, not by the first round."""
    client = new_client()
    try:
        client.state(timeout=FIRST_CALL_TIMEOUT_S)
    finally:
        client.close()


def run(
    lab: VmLab,
    rounds: int,
    every: int,
    refused: bool = False,
    trace_frames: int = 0,
    malloc_arena_max: int = 0,
) -> dict[str, Any]:
    new_client, close = client_factory(lab)
    if not refused and not _on_primaries(new_client):
        from lab.coordinated import configure

        configure(lab)  # ptmig's pools and teams, every team plugged and bound
    _restart_agent(lab, trace_frames, malloc_arena_max)
    _first_call(new_client)
    samples = [{"round": 0, **_sample(lab, maps=True)}]
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
                samples.append({"round": number, **_sample(lab, maps=number == rounds)})
                print(json.dumps(samples[-1]), file=sys.stderr, flush=True)  # as it goes
    finally:
        close()
    result: dict[str, Any] = {
        "rounds": rounds,
        "rounds_of_refused_calls": refused,
        "trace_frames": trace_frames,
        "malloc_arena_max": malloc_arena_max,
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


def main(
    rounds: int,
    every: int,
    refused: bool,
    trace_frames: int,
    as_json: bool,
    malloc_arena_max: int = 0,
) -> int:
    lab = VmLab()
    if not lab.state.netns:
        raise LabError("the lab is not up: run 'ptmig-lab up' first")
    result = run(lab, rounds, every, refused, trace_frames, malloc_arena_max)
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
