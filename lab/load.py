"""What else the machine did while a run measured: one sampler for the demo and every
benchmark, so a figure taken on a busy machine says so beside it.

Why: the lab's guests run under TCG on two cores; a busy loop elsewhere takes cycles the
guests' vCPUs and the pingers need, and the loss it causes looks like ptmig's.  The
sampler reads /proc once a second from a thread of the run's own process: the load
average and the runnable tasks (``procs_running``), the CPU's busy and steal time over the
run (/proc/stat, all CPUs), and each process's CPU time, split by whose it is:

* ``own``: this process and its descendants (pingers, ``ptmig`` commands, the lab's
  libvirtds when this run started them);
* ``lab``: processes in the network namespace of one of the lab's libvirtds (its QEMUs,
  which libvirt gives a private mount namespace each but leaves in the host's network);
* ``kernel``: kernel threads;
* ``other``: everything else, QEMUs of other labs or VMs among them (``other_qemu``).

A process that ends is reaped by its parent, whose reaped-children time then holds the
child's whole time: a child seen alive counts as its own kind and its time is taken off the
parent's; one never seen counts as its parent's kind (a build's compilers as the shell's).
Busy time no seen process accounts for (a process whose parent is gone too, interrupts) is
``unattributed_cpu_s``, which the verdict does not use.  The verdict (:func:`judge`) is
stated in :data:`THRESHOLDS`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HZ = os.sysconf("SC_CLK_TCK")
INTERVAL_S = 1.0

#: A run is flagged busy when any of these is reached over it (cores: CPU seconds per
#: second of the run, so 0.25 is a quarter of one core, an eighth of this 2-core machine).
THRESHOLDS = {
    "other_cpu_cores": 0.25,  # processes neither the run's nor the lab's
    "other_qemu_cpu_cores": 0.05,  # another VM that is not idle
    "steal_frac": 0.05,  # the hypervisor under this machine took the CPU
}


@dataclass(frozen=True)
class CpuTimes:
    """The first line of /proc/stat (all CPUs), in clock ticks; guest time is inside user."""

    user: int
    nice: int
    system: int
    idle: int
    iowait: int
    irq: int
    softirq: int
    steal: int

    @property
    def total(self) -> int:
        return (
            self.user
            + self.nice
            + self.system
            + self.idle
            + self.iowait
            + self.irq
            + self.softirq
            + self.steal
        )

    @property
    def busy(self) -> int:
        """Time a CPU ran something for this machine (not idle, not waiting, not stolen)."""
        return self.user + self.nice + self.system + self.irq + self.softirq


def parse_proc_stat(text: str) -> tuple[CpuTimes, int]:
    """/proc/stat: the all-CPU line and ``procs_running``; ValueError when either is missing."""
    cpu: CpuTimes | None = None
    running: int | None = None
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            values = [int(v) for v in parts[1:9]] + [0] * max(0, 9 - len(parts))
            cpu = CpuTimes(*values[:8])
        elif parts and parts[0] == "procs_running":
            running = int(parts[1])
    if cpu is None or running is None:
        raise ValueError("not /proc/stat: no 'cpu' or 'procs_running' line")
    return cpu, running


def parse_loadavg(text: str) -> float:
    """/proc/loadavg's one-minute figure."""
    return float(text.split()[0])


@dataclass(frozen=True)
class ProcStat:
    """What the sampler needs of /proc/PID/stat: the process's identity and CPU time."""

    pid: int
    comm: str
    ppid: int
    flags: int
    #: utime + stime + cutime + cstime: a reaped child's time moves into its parent's, so
    #: a long-lived parent (a shell running a build) carries its short-lived children.
    cpu_ticks: int
    starttime: int  # clock ticks after boot

    @property
    def kernel_thread(self) -> bool:
        return bool(self.flags & 0x00200000) or self.pid == 2 or self.ppid == 2  # PF_KTHREAD


def parse_pid_stat(text: str) -> ProcStat:
    """/proc/PID/stat; the command name may hold spaces and parentheses, so the fields are
    counted from the last ')'."""
    pid_part, _, rest = text.partition(" (")
    comm, _, tail = rest.rpartition(") ")
    fields = tail.split()
    if not comm or len(fields) < 20:
        raise ValueError(f"not a /proc/PID/stat line: {text[:80]!r}")
    # fields[0] is field 3 (state): field n is fields[n - 3]
    return ProcStat(
        pid=int(pid_part),
        comm=comm,
        ppid=int(fields[1]),
        flags=int(fields[6]),
        cpu_ticks=sum(int(v) for v in fields[11:15]),
        starttime=int(fields[19]),
    )


OWN, LAB, KERNEL, OTHER = "own", "lab", "kernel", "other"
#: A process keeps the first of these it was ever seen as: a QEMU that has exited is a
#: zombie until reaped, and a zombie's namespaces cannot be read (it would look other).
KIND_RANK = (OWN, LAB, KERNEL, OTHER)


def classify(
    procs: Mapping[int, ProcStat],
    own_pid: int,
    net_ns: Mapping[int, str],
    lab_net_ns: frozenset[str],
) -> dict[int, str]:
    """Whose each process is (module docstring): descendants of *own_pid* first, then the
    lab's network namespaces, then kernel threads; the rest is other."""
    out: dict[int, str] = {}

    def is_own(pid: int) -> bool:
        seen = set()
        while pid > 1 and pid not in seen:
            if pid == own_pid:
                return True
            seen.add(pid)
            parent = procs.get(pid)
            if parent is None:
                return False
            pid = parent.ppid
        return False

    for pid, p in procs.items():
        if is_own(pid):
            out[pid] = OWN
        elif net_ns.get(pid) in lab_net_ns:
            out[pid] = LAB
        elif p.kernel_thread:
            out[pid] = KERNEL
        else:
            out[pid] = OTHER
    return out


def is_qemu(comm: str) -> bool:
    return comm.startswith(("qemu-system", "qemu-kvm"))


@dataclass(frozen=True)
class Snapshot:
    """One reading of /proc."""

    at: float  # monotonic s
    uptime_ticks: int
    cpu: CpuTimes
    running: int
    loadavg_1m: float
    procs: dict[int, ProcStat]
    kinds: dict[int, str]


@dataclass(frozen=True)
class ProcessCpu:
    """A process's CPU time over the run."""

    pid: int
    comm: str
    cpu_s: float


@dataclass(frozen=True)
class MachineLoad:
    """The machine's load over one run, and whether it was busy (:func:`judge`)."""

    started_utc: str
    seconds: float
    cpus: int
    samples: int
    loadavg_1m_start: float
    loadavg_1m_end: float
    loadavg_1m_max: float
    #: Runnable tasks (/proc/stat procs_running, the sampler itself not counted).
    runnable_mean: float
    runnable_max: int
    cpu_busy_frac: float  # of all CPUs' time over the run
    cpu_steal_frac: float
    own_cpu_s: float
    lab_cpu_s: float
    kernel_cpu_s: float
    other_cpu_s: float
    unattributed_cpu_s: float
    other_qemu: list[ProcessCpu]
    top_other: list[ProcessCpu]
    busy: bool
    reasons: list[str]
    thresholds: dict[str, float] = field(default_factory=lambda: dict(THRESHOLDS))
    #: What ran: the command line and the checkout's commit (``-dirty`` with changes).
    command: str = ""
    commit: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MachineLoad:
        """The record back from :meth:`to_dict`'s output (a run's JSON)."""
        procs = {k: [ProcessCpu(**p) for p in data[k]] for k in ("other_qemu", "top_other")}
        return cls(**{**data, **procs})

    def summary(self) -> str:
        """One line to print beside a run's figures."""
        verdict = "BUSY: " + "; ".join(self.reasons) if self.busy else "quiet"
        return (
            f"machine {verdict} (over {self.seconds:.0f} s: load {self.loadavg_1m_max:.2f} max, "
            f"CPU busy {100 * self.cpu_busy_frac:.0f}%, steal {100 * self.cpu_steal_frac:.1f}%, "
            f"others {self.other_cpu_s / max(self.seconds, 1e-9):.2f} cores, "
            f"{len(self.other_qemu)} other QEMU, runnable {self.runnable_mean:.1f} mean)"
        )


def judge(
    seconds: float, steal_frac: float, other_cpu_s: float, other_qemu_cpu_s: float
) -> list[str]:
    """The reasons to call the run busy (none: quiet), against :data:`THRESHOLDS`."""
    reasons = []
    span = max(seconds, 1e-9)
    if other_cpu_s / span >= THRESHOLDS["other_cpu_cores"]:
        reasons.append(
            f"other processes used {other_cpu_s / span:.2f} cores "
            f"(>= {THRESHOLDS['other_cpu_cores']})"
        )
    if other_qemu_cpu_s / span >= THRESHOLDS["other_qemu_cpu_cores"]:
        reasons.append(
            f"other QEMUs used {other_qemu_cpu_s / span:.2f} cores "
            f"(>= {THRESHOLDS['other_qemu_cpu_cores']})"
        )
    if steal_frac >= THRESHOLDS["steal_frac"]:
        reasons.append(f"steal {100 * steal_frac:.1f}% (>= {100 * THRESHOLDS['steal_frac']:.0f}%)")
    return reasons


@dataclass(frozen=True)
class _Seen:
    """A process across the snapshots: its CPU base, its last reading and kind, the index
    of the last snapshot it was in, and its parent's key there."""

    base: int
    stat: ProcStat
    kind: str
    index: int
    parent: tuple[int, int] | None


def summarize(snapshots: Sequence[Snapshot], started_utc: str, cpus: int) -> MachineLoad:
    """The run's record from its snapshots (at least two: the first and the last)."""
    if len(snapshots) < 2:
        raise ValueError("a load record needs at least two snapshots")
    first, last = snapshots[0], snapshots[-1]
    seconds = last.at - first.at
    dt = last.cpu.total - first.cpu.total or 1
    # Per process, keyed (pid, starttime) against PID reuse: CPU from its first sighting
    # (or from its start, when it started after the first snapshot) to its last.
    seen: dict[tuple[int, int], _Seen] = {}
    for index, snap in enumerate(snapshots):
        for pid, p in snap.procs.items():
            key = (pid, p.starttime)
            kind = snap.kinds.get(pid, OTHER)
            parent = snap.procs.get(p.ppid)
            parent_key = (parent.pid, parent.starttime) if parent is not None else None
            old = seen.get(key)
            if old is None:
                late = snap is not first and p.starttime > first.uptime_ticks
                seen[key] = _Seen(0 if late else p.cpu_ticks, p, kind, index, parent_key)
            else:
                kind = min(kind, old.kind, key=KIND_RANK.index)
                seen[key] = _Seen(old.base, p, kind, index, parent_key)
    # A process gone while its parent was still seen after was reaped by it: its
    # whole time (from before the run too) went into the parent's reaped-children time.
    # It counts as its own kind, from its base; its whole time is taken off the parent's.
    # A parent gone in the same interval passed it on to its own parent: up the chain.
    reaped: dict[tuple[int, int], int] = {}
    for child in seen.values():
        up = child.parent
        while up is not None and up in seen and seen[up].index == child.index:
            up = seen[up].parent
        if up is not None and up in seen and seen[up].index > child.index:
            reaped[up] = reaped.get(up, 0) + child.stat.cpu_ticks
    by_kind = {OWN: 0, LAB: 0, KERNEL: 0, OTHER: 0}
    others: list[ProcessCpu] = []
    for key, entry in seen.items():
        ticks = max(0, entry.stat.cpu_ticks - entry.base - reaped.get(key, 0))
        by_kind[entry.kind] += ticks
        if entry.kind == OTHER and ticks:
            others.append(ProcessCpu(entry.stat.pid, entry.stat.comm, round(ticks / HZ, 2)))
    busy_ticks = last.cpu.busy - first.cpu.busy
    steal = (last.cpu.steal - first.cpu.steal) / dt
    other_qemu = [o for o in others if is_qemu(o.comm)]
    # qemu processes that used no CPU are still other VMs on the machine
    idle_qemus = {
        key: entry.stat
        for key, entry in seen.items()
        if entry.kind == OTHER and is_qemu(entry.stat.comm)
    }
    listed = {o.pid for o in other_qemu}
    other_qemu += [
        ProcessCpu(p.pid, p.comm, 0.0) for p in idle_qemus.values() if p.pid not in listed
    ]
    # Readings of /proc/PID/stat and /proc/stat differ by a few per cent over a busy
    # run (taken at other instants): the others' share is bounded by the CPU's counters.
    accounted = by_kind[OWN] + by_kind[LAB] + by_kind[KERNEL]
    other_s = min(by_kind[OTHER], max(0, busy_ticks - accounted)) / HZ
    reasons = judge(seconds, steal, other_s, sum(o.cpu_s for o in other_qemu))
    running = [max(0, s.running - 1) for s in snapshots]
    return MachineLoad(
        started_utc=started_utc,
        seconds=round(seconds, 2),
        cpus=cpus,
        samples=len(snapshots),
        loadavg_1m_start=first.loadavg_1m,
        loadavg_1m_end=last.loadavg_1m,
        loadavg_1m_max=max(s.loadavg_1m for s in snapshots),
        runnable_mean=round(sum(running) / len(running), 2),
        runnable_max=max(running),
        cpu_busy_frac=round(busy_ticks / dt, 3),
        cpu_steal_frac=round(steal, 4),
        own_cpu_s=round(by_kind[OWN] / HZ, 2),
        lab_cpu_s=round(by_kind[LAB] / HZ, 2),
        kernel_cpu_s=round(by_kind[KERNEL] / HZ, 2),
        other_cpu_s=round(other_s, 2),
        unattributed_cpu_s=round(max(0, busy_ticks - sum(by_kind.values())) / HZ, 2),
        other_qemu=sorted(other_qemu, key=lambda o: -o.cpu_s),
        top_other=sorted(others, key=lambda o: -o.cpu_s)[:5],
        busy=bool(reasons),
        reasons=reasons,
    )


def checkout_commit() -> str:
    """This checkout's commit, ``-dirty`` when it has uncommitted changes ("" outside git)."""
    root = str(Path(__file__).resolve().parents[1])

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", root, *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("-dirty" if dirty else "")


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text()
    except OSError:  # the process ended between listing and reading
        return None


def _net_ns(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


def take_snapshot(own_pid: int, lab_net_ns: frozenset[str]) -> Snapshot:
    """One reading of /proc (a few milliseconds for a few hundred processes)."""
    at = time.monotonic()
    cpu, running = parse_proc_stat(Path("/proc/stat").read_text())
    loadavg = parse_loadavg(Path("/proc/loadavg").read_text())
    uptime = int(float(Path("/proc/uptime").read_text().split()[0]) * HZ)
    procs: dict[int, ProcStat] = {}
    net_ns: dict[int, str] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        text = _read(f"/proc/{entry.name}/stat")
        if text is None:
            continue
        p = parse_pid_stat(text)
        procs[p.pid] = p
        if lab_net_ns and not p.kernel_thread and (ns := _net_ns(p.pid)) is not None:
            net_ns[p.pid] = ns
    kinds = classify(procs, own_pid, net_ns, lab_net_ns)
    return Snapshot(at, uptime, cpu, running, loadavg, procs, kinds)


class LoadSampler:
    """Samples /proc every *interval* s from a daemon thread between start and stop;
    ``with LoadSampler(lab_pids) as load: ...`` then ``load.record``.

    *lab_pids*: the lab's libvirtds (``VmLab.state.pids``), whose network namespaces
    hold the lab's QEMUs; a callable is read at start, after a lab the run brings up is up.
    """

    def __init__(
        self,
        lab_pids: Iterable[int] | Callable[[], Iterable[int]] = (),
        interval: float = INTERVAL_S,
    ) -> None:
        self._lab_pids = lab_pids
        self.interval = interval
        self._snapshots: list[Snapshot] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_utc = ""
        self._lab_ns: frozenset[str] = frozenset()
        self.record: MachineLoad | None = None

    @property
    def snapshots(self) -> list[Snapshot]:
        return list(self._snapshots)

    def start(self) -> LoadSampler:
        pids = self._lab_pids() if callable(self._lab_pids) else self._lab_pids
        self._lab_ns = frozenset(ns for pid in pids if (ns := _net_ns(pid)) is not None)
        self._started_utc = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._snapshots = [take_snapshot(os.getpid(), self._lab_ns)]
        self._thread = threading.Thread(target=self._loop, name="load-sampler", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError, ValueError):
                self._snapshots.append(take_snapshot(os.getpid(), self._lab_ns))

    def stop(self) -> MachineLoad:
        """The record of the run so far (idempotent: a second stop returns the same)."""
        if self.record is not None:
            return self.record
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._snapshots.append(take_snapshot(os.getpid(), self._lab_ns))
        load = summarize(self._snapshots, self._started_utc, os.cpu_count() or 1)
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.record = dataclasses.replace(load, command=command, commit=checkout_commit())
        return self.record

    def __enter__(self) -> LoadSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
