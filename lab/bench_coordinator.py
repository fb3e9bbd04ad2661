"""Benchmark of the coordinator's own cost at scale: ``ptmig evacuate`` of 1..1000 domains.

Over the unit tests' in-memory fakes (tests/unit/host/workflow_fakes.py: hypervisors,
guests and agents in this process, the lease's settle wait 0), so what is measured is the
coordinator, its workflow, its journal (a real SQLite file, fsynced as in production),
and the fakes standing in for libvirt (their XML rendering is part of the CPU time; a real
libvirtd does that in its own process).  No VM, no lab.

The fleet: the source host runs N domains with one team each; every group of
``PER_TARGET`` domains has its own pool (``p0``, ``p1``...) on the source and on one target
host, which is where those domains' devices are free, so each host's domain list and
pool stay the size of a real host's whatever N is.  (With two targets taking everything,
each migration's plug reads every domain on its destination: that per-host cost is
measured as its own layout, ``crowded``: two targets receive everything, each with a
pool as large as N.)

Each configuration runs in a fresh interpreter (``--one``), so that its memory figures are
its own: tracemalloc's peak over the evacuation (in a second run: tracing slows it), and
the resident set's growth (VmRSS before and after).  The journal's size is the database
and its WAL after the run; its rows are the workflows' and their steps'.

Throughput: the same evacuation with fake migration jobs that sleep (outside any lock),
with 1 and P workers: P workers finishing ~P times as fast shows that nothing holds a
lock across domains.

The coordinator's CPU: the process's CPU time minus what the fakes spend inside their
calls (every fake libvirt and agent call goes through ``World.op``; its thread's CPU
there is counted apart): in production that work is libvirtd's (formatting each domain's
XML, its own checks) and the guest agent's, in their own processes.  The goal (issue 25):
the coordinator's CPU per domain at the largest size at most ``GOAL_RATIO`` times that at
10 domains, in every layout, the crowded one (two targets receive everything) included.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lab.load import LoadSampler, MachineLoad

REPO = Path(__file__).resolve().parents[1]
SIZES = (1, 10, 100, 300, 1000)
CROWDED = (10, 100, 300, 1000)
PARALLEL = (1, 8)
#: Flat: coordinator CPU per domain at the largest size / at the smallest of at least 10.
GOAL_RATIO = 1.2
PER_TARGET = 8  # domains per target host (and devices per pool)
SOURCE = "fake://a"
#: Throughput: domains, seconds each fake migration job sleeps, worker counts.  The job is
#: long against the ~20 ms of CPU a domain costs (under the GIL, serial whatever the
#: workers), so that what the workers overlap is the waiting a real migration does.
THROUGHPUT = (32, 1.0, (1, 8, 16))


def fakes() -> ModuleType:
    """The unit tests' fakes (not part of the installed product: a checkout's tests/)."""
    path = str(REPO / "tests" / "unit" / "host")
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module("workflow_fakes")


@dataclass
class ScaleRun:
    domains: int
    parallel: int
    targets: int
    outcomes: dict[str, int]
    wall_s: float
    cpu_s: float
    wall_per_domain_ms: float
    cpu_per_domain_ms: float
    #: CPU inside the fakes' calls (libvirtd's and the agent's work in production).
    fake_libvirt_cpu_s: float
    fake_agent_cpu_s: float
    #: The process's CPU minus the fakes': the coordinator's own, the goal's figure.
    coordinator_cpu_s: float
    coordinator_cpu_per_domain_ms: float
    rss_growth_kib: int
    rss_per_domain_kib: float
    tracemalloc_peak_kib: float
    tracemalloc_per_domain_kib: float
    journal_bytes: int  # the database after a checkpoint
    journal_bytes_per_domain: float
    #: The WAL file's size at the end, per domain (SQLite checkpoints it every 1000
    #: pages and reuses it, so the file stops growing near 4 MiB).
    journal_wal_bytes_per_domain: float
    journal_rows: int
    journal_rows_per_s: float


@dataclass
class ThroughputRun:
    domains: int
    parallel: int
    job_s: float
    wall_s: float
    domains_per_s: float


def fleet(n: int, crowded: bool = False, job_s: float = 0.0) -> tuple[Any, tuple[str, ...]]:
    """The world: *n* domains on the source, their target hosts (see the docstring)."""
    f = fakes()
    targets: tuple[str, ...]
    if crowded:
        targets = ("fake://b", "fake://c")
        world = f.World(
            tuple(f.numbered_guest(i) for i in range(n)),
            slots={SOURCE: n, targets[0]: n, targets[1]: n},
            hosts=(SOURCE, *targets),
        )
    else:
        groups = max(1, math.ceil(n / PER_TARGET))
        targets = tuple(f"fake://t{g}" for g in range(groups))
        world = f.World((), hosts=(SOURCE, *targets), slots=dict.fromkeys((SOURCE, *targets)))
        for g, uri in enumerate(targets):
            first = g * PER_TARGET
            world.define_pool(SOURCE, f"p{g}", range(first, first + PER_TARGET))
            world.define_pool(uri, f"p{g}", range(PER_TARGET))
        for i in range(n):
            world.add_guest(f.numbered_guest(i, pool=f"p{i // PER_TARGET}"))
    world.record_calls = False  # the call log would grow with the run
    world.migration_job_s = job_s
    return world, targets


class FakeCpu:
    """CPU time the fakes spend inside their calls, per kind (libvirt, agent): each call
    through ``World.op`` is timed on its own thread's CPU clock, the outermost only."""

    def __init__(self, world: Any) -> None:
        self.libvirt = 0.0
        self.agent = 0.0
        self._local = threading.local()
        self._lock = threading.Lock()
        inner = world.op

        @contextmanager
        def op(where: str, method: str, subject: str = "") -> Iterator[None]:
            if getattr(self._local, "inside", False):
                with inner(where, method, subject):
                    yield
                return
            self._local.inside = True
            start = time.thread_time()
            try:
                with inner(where, method, subject):
                    yield
            finally:
                spent = time.thread_time() - start
                self._local.inside = False
                with self._lock:
                    if where == "agent":
                        self.agent += spent
                    else:
                        self.libvirt += spent

        world.op = op


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def run_one(
    n: int, parallel: int, *, crowded: bool = False, job_s: float = 0.0, trace: bool = False
) -> dict[str, Any]:
    """One evacuation of *n* domains, measured; the figures as a plain dict."""
    import gc

    from host.workflow.journal import Journal
    from host.workflow.model import EvacuationRequest, EvacuationTarget

    world, targets = fleet(n, crowded, job_s)
    fake_cpu = FakeCpu(world)
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="ptmig-bench-") as tmp:
        path = Path(tmp) / "journal.sqlite"
        with Journal(path) as journal:
            coordinator = world.coordinator(journal)
            request = EvacuationRequest(
                SOURCE, tuple(EvacuationTarget(t) for t in targets), parallel=parallel
            )
            gc.collect()
            rss_before = _rss_kib()
            if trace:
                tracemalloc.start()
            wall, cpu = time.perf_counter(), time.process_time()
            report = coordinator.evacuate(request)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            peak = tracemalloc.get_traced_memory()[1] if trace else 0
            if trace:
                tracemalloc.stop()
            rss_after = _rss_kib()
            db = journal._db  # the benchmark's own look at the file
            with journal._lock:
                rows = sum(
                    int(db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
                    for table in ("workflows", "steps")
                )
            wal = sum(p.stat().st_size for p in Path(tmp).glob("journal.sqlite-wal"))
            with journal._lock:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            size = path.stat().st_size
    outcomes: dict[str, int] = {}
    for d in report.domains:
        outcomes[str(d.outcome)] = outcomes.get(str(d.outcome), 0) + 1
    return {
        "domains": n,
        "parallel": report.parallel,
        "targets": len(targets),
        "outcomes": outcomes,
        "wall_s": wall,
        "cpu_s": cpu,
        "fake_libvirt_cpu_s": fake_cpu.libvirt,
        "fake_agent_cpu_s": fake_cpu.agent,
        "rss_growth_kib": max(0, rss_after - rss_before),
        "tracemalloc_peak_kib": peak / 1024,
        "journal_bytes": size,
        "journal_wal_bytes": wal,
        "journal_rows": rows,
    }


def _in_child(n: int, parallel: int, *flags: str) -> dict[str, Any]:
    """:func:`run_one` in a fresh interpreter (its memory figures are its own)."""
    out = subprocess.run(
        [sys.executable, "-m", "lab.bench_coordinator", "--one", str(n), str(parallel), *flags],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'protos'}"},
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def scale_run(
    n: int, parallel: int, *, crowded: bool = False, child: bool = True, memory: bool = True
) -> ScaleRun:
    """Timed in one run, traced (tracemalloc) in another, unless not *memory*."""
    flags = ("--crowded",) if crowded else ()
    timed = _in_child(n, parallel, *flags) if child else run_one(n, parallel, crowded=crowded)
    traced = {"tracemalloc_peak_kib": 0.0}
    if memory:
        traced = (
            _in_child(n, parallel, *flags, "--trace")
            if child
            else run_one(n, parallel, crowded=crowded, trace=True)
        )
    own = timed["cpu_s"] - timed["fake_libvirt_cpu_s"] - timed["fake_agent_cpu_s"]
    return ScaleRun(
        domains=n,
        parallel=timed["parallel"],
        targets=timed["targets"],
        outcomes=timed["outcomes"],
        wall_s=round(timed["wall_s"], 3),
        cpu_s=round(timed["cpu_s"], 3),
        wall_per_domain_ms=round(timed["wall_s"] / n * 1000, 2),
        cpu_per_domain_ms=round(timed["cpu_s"] / n * 1000, 2),
        fake_libvirt_cpu_s=round(timed["fake_libvirt_cpu_s"], 3),
        fake_agent_cpu_s=round(timed["fake_agent_cpu_s"], 3),
        coordinator_cpu_s=round(own, 3),
        coordinator_cpu_per_domain_ms=round(own / n * 1000, 2),
        rss_growth_kib=timed["rss_growth_kib"],
        rss_per_domain_kib=round(timed["rss_growth_kib"] / n, 1),
        tracemalloc_peak_kib=round(traced["tracemalloc_peak_kib"], 1),
        tracemalloc_per_domain_kib=round(traced["tracemalloc_peak_kib"] / n, 1),
        journal_bytes=timed["journal_bytes"],
        journal_bytes_per_domain=round(timed["journal_bytes"] / n),
        journal_wal_bytes_per_domain=round(timed["journal_wal_bytes"] / n),
        journal_rows=timed["journal_rows"],
        journal_rows_per_s=round(timed["journal_rows"] / timed["wall_s"]),
    )


def throughput(n: int, job_s: float, parallel: int, child: bool = True) -> ThroughputRun:
    flags = ("--job-s", str(job_s))
    r = _in_child(n, parallel, *flags) if child else run_one(n, parallel, job_s=job_s)
    return ThroughputRun(n, r["parallel"], job_s, round(r["wall_s"], 3), round(n / r["wall_s"], 2))


def judged_sizes(runs: list[ScaleRun]) -> tuple[int, int] | None:
    """The sizes a layout is judged between: the smallest of at least 10, the largest."""
    sizes = [r.domains for r in runs]
    small = min((d for d in sizes if d >= 10), default=None)
    return None if small is None or small == max(sizes) else (small, max(sizes))


def ratio(runs: list[ScaleRun], key: str) -> float | None:
    """Per-domain *key* at the largest size over that at the smallest of at least 10
    (1.0: linear growth in all, flat per domain)."""
    found: dict[int, float] = {r.domains: getattr(r, key) for r in runs}
    judged = judged_sizes(runs)
    if judged is None or not found[judged[0]]:
        return None
    return round(found[judged[1]] / found[judged[0]], 2)


def verdict(layout: str, runs: list[ScaleRun]) -> dict[str, Any]:
    """One layout's figures against the goal (the coordinator's CPU per domain)."""
    own = ratio(runs, "coordinator_cpu_per_domain_ms")
    return {
        "layout": layout,
        "sizes": [r.domains for r in runs],
        "judged_between": judged_sizes(runs),
        "coordinator_cpu_per_domain_ms": [r.coordinator_cpu_per_domain_ms for r in runs],
        "process_cpu_per_domain_ms": [r.cpu_per_domain_ms for r in runs],
        "ratio": own,
        "process_cpu_ratio": ratio(runs, "cpu_per_domain_ms"),
        "goal": f"<= {GOAL_RATIO}",
        "met": own is not None and own <= GOAL_RATIO,
    }


def bench(
    sizes: tuple[int, ...] = SIZES,
    parallel: tuple[int, ...] = PARALLEL,
    through: tuple[int, float, tuple[int, ...]] = THROUGHPUT,
    crowded: tuple[int, ...] = CROWDED,
    child: bool = True,
) -> dict[str, Any]:
    """Every configuration, with the machine's load over them all (lab.load: the
    configurations run in this process's children, so they are its own)."""
    sampler = LoadSampler().start()
    runs = [scale_run(n, p, child=child) for p in parallel for n in sizes]
    crowd = [scale_run(n, 1, crowded=True, child=child, memory=False) for n in crowded]
    n, job_s, workers = through
    tp = [throughput(n, job_s, p, child) for p in workers]
    layouts = [
        verdict(f"a target per {PER_TARGET} domains, {p} worker(s)", by)
        for p in parallel
        if (by := [r for r in runs if r.parallel == p])
    ]
    if crowd:
        layouts.append(verdict("two targets receive everything, 1 worker", crowd))
    return {
        "goal": {
            "figure": "coordinator CPU per domain (process CPU minus the fakes' calls) at the "
            "largest size over that at the smallest of at least 10 domains, every layout",
            "limit": GOAL_RATIO,
            "met": bool(layouts) and all(v["met"] for v in layouts),
        },
        "layouts": layouts,
        "runs": [asdict(r) for r in runs],
        "crowded": [asdict(r) for r in crowd],
        "throughput": [asdict(t) for t in tp],
        "speedup": {
            f"{t.parallel} vs {tp[0].parallel}": round(t.domains_per_s / tp[0].domains_per_s, 2)
            for t in tp[1:]
        },
        "machine_load": sampler.stop().to_dict(),
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        "domains parallel targets  wall s  cpu s  cpu ms/dom  own ms/dom  rss KiB/dom  "
        "tracemalloc KiB/dom  journal B/dom  WAL B/dom  rows/s  outcomes"
    ]
    for r in result["runs"] + result["crowded"]:
        lines.append(
            f"{r['domains']:>7} {r['parallel']:>8} {r['targets']:>7} {r['wall_s']:>7.2f} "
            f"{r['cpu_s']:>6.2f} {r['cpu_per_domain_ms']:>11.2f} "
            f"{r['coordinator_cpu_per_domain_ms']:>11.2f} {r['rss_per_domain_kib']:>12.1f} "
            f"{r['tracemalloc_per_domain_kib']:>20.1f} {r['journal_bytes_per_domain']:>14} "
            f"{r['journal_wal_bytes_per_domain']:>10} {r['journal_rows_per_s']:>7}  "
            f"{r['outcomes']}"
        )
    for t in result["throughput"]:
        lines.append(
            f"throughput: {t['domains']} domains, jobs of {t['job_s']} s, {t['parallel']} "
            f"at once: {t['wall_s']:.2f} s, {t['domains_per_s']} domains/s"
        )
    for v in result["layouts"]:
        lines.append(
            f"{v['layout']}: coordinator CPU per domain {v['ratio']}x between "
            f"{v['judged_between']} domains (process {v['process_cpu_ratio']}x), goal {v['goal']}: "
            + ("met" if v["met"] else "not met")
        )
    lines.append(f"speedup: {result['speedup']}")
    lines.append(MachineLoad.from_dict(result["machine_load"]).summary())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.bench_coordinator")
    p.add_argument("--one", nargs=2, type=int, metavar=("DOMAINS", "PARALLEL"))
    p.add_argument("--crowded", action="store_true")
    p.add_argument("--trace", action="store_true")
    p.add_argument("--job-s", type=float, default=0.0)
    args = p.parse_args(argv)
    if args.one:
        n, parallel = args.one
        print(
            json.dumps(
                run_one(n, parallel, crowded=args.crowded, job_s=args.job_s, trace=args.trace)
            )
        )
        return 0
    return run(as_json=False)


def run(
    *,
    as_json: bool,
    sizes: tuple[int, ...] = SIZES,
    parallel: tuple[int, ...] = PARALLEL,
    crowded: tuple[int, ...] = CROWDED,
) -> int:
    """``ptmig-lab bench-coordinator``."""
    result = bench(sizes, parallel, crowded=crowded)
    print(json.dumps(result, indent=1) if as_json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
