"""The machine-load sampler: /proc parsing, whose each process is, the run's record and
its verdict; and one live run that tells its own busy child from an orphan's."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from lab.load import (
    HZ,
    KERNEL,
    LAB,
    OTHER,
    OWN,
    THRESHOLDS,
    CpuTimes,
    LoadSampler,
    MachineLoad,
    ProcStat,
    Snapshot,
    classify,
    judge,
    parse_loadavg,
    parse_pid_stat,
    parse_proc_stat,
    summarize,
)

STAT = """cpu  100 5 50 800 10 0 5 30 0 0
cpu0 50 2 25 400 5 0 2 15 0 0
intr 1 2 3
ctxt 99
procs_running 3
procs_blocked 0
"""


def test_parse_proc_stat() -> None:
    cpu, running = parse_proc_stat(STAT)
    assert cpu == CpuTimes(100, 5, 50, 800, 10, 0, 5, 30)
    assert (cpu.total, cpu.busy, running) == (1000, 160, 3)


def test_parse_proc_stat_refuses_other_text() -> None:
    with pytest.raises(ValueError, match="not /proc/stat"):
        parse_proc_stat("cpu  1 2 3 4 5 6 7 8\n")


def test_parse_loadavg() -> None:
    assert parse_loadavg("1.63 1.42 1.36 4/150 9177\n") == 1.63


def pid_stat(
    pid: int, comm: str, ppid: int, utime: int, stime: int, start: int, flags: int = 0
) -> str:
    fields = ["S", str(ppid), *["0"] * 4, str(flags), *["0"] * 4, str(utime), str(stime)]
    fields += ["7", "3", "20", "0", "1", "0", str(start), "12345"]
    return f"{pid} ({comm}) " + " ".join(fields)


def test_parse_pid_stat_with_a_name_holding_spaces_and_parentheses() -> None:
    p = parse_pid_stat(pid_stat(42, "a (b) c", 7, 11, 4, 5000))
    assert (p.pid, p.comm, p.ppid, p.starttime) == (42, "a (b) c", 7, 5000)
    assert p.cpu_ticks == 11 + 4 + 7 + 3  # with the reaped children's time
    assert not p.kernel_thread


def test_parse_pid_stat_refuses_garbage() -> None:
    with pytest.raises(ValueError, match="not a /proc/PID/stat"):
        parse_pid_stat("42 (x) S 1 2")


def proc(
    pid: int, ppid: int, ticks: int = 0, comm: str = "p", start: int = 0, kthread: bool = False
) -> ProcStat:
    return ProcStat(pid, comm, ppid, 0x00200000 if kthread else 0, ticks, start)


def test_classify_own_lab_kernel_other() -> None:
    procs = {
        1: proc(1, 0),
        2: proc(2, 0, kthread=True),
        10: proc(10, 1),  # the run
        11: proc(11, 10),  # its child
        12: proc(12, 11),  # and grandchild
        20: proc(20, 1, comm="qemu-system-x86"),  # in the lab's network namespace
        30: proc(30, 2, kthread=True),
        40: proc(40, 1, comm="qemu-system-x86"),  # someone else's VM
    }
    ns = {20: "net:[9]", 40: "net:[1]", 10: "net:[1]", 11: "net:[9]"}
    kinds = classify(procs, 10, ns, frozenset({"net:[9]"}))
    assert kinds == {1: OTHER, 2: KERNEL, 10: OWN, 11: OWN, 12: OWN, 20: LAB, 30: KERNEL, 40: OTHER}


def snap(
    at: float,
    busy: int,
    steal: int,
    procs: dict[int, ProcStat],
    kinds: dict[int, str],
    uptime: int = 0,
) -> Snapshot:
    idle = 2 * int(at * HZ) - busy - steal  # two CPUs' ticks since 0
    return Snapshot(at, uptime, CpuTimes(busy, 0, 0, idle, 0, 0, 0, steal), 2, 1.0, procs, kinds)


def test_summarize_splits_cpu_by_whose_and_flags_others() -> None:
    s = HZ  # one second of ticks
    first = snap(
        0.0,
        0,
        0,
        {10: proc(10, 1, 0), 40: proc(40, 1, 5 * s, "qemu-system-x86")},
        {10: OWN, 40: OTHER},
        uptime=100,
    )
    # 10 s later: own used 4 s, the other QEMU 6 s more; a short-lived own child came
    # (started after the first snapshot: all its time counts) and a process that ended
    # with its parent alive is left to its parent's reaped-children time
    mid = snap(
        5.0,
        0,
        0,
        {
            10: proc(10, 1, 1 * s),
            40: proc(40, 1, 8 * s, "qemu-system-x86"),
            11: proc(11, 10, 2 * s, start=200),
        },
        {10: OWN, 40: OTHER, 11: OWN},
    )
    last = snap(
        10.0,
        12 * s,
        0,
        {10: proc(10, 1, 4 * s), 40: proc(40, 1, 11 * s, "qemu-system-x86")},
        {10: OWN, 40: OTHER},
    )
    load = summarize([first, mid, last], "2026-01-01T00:00:00Z", 2)
    assert load.seconds == 10.0
    assert load.own_cpu_s == 4.0  # the child's 2 s are inside the parent's 4 s
    assert load.other_cpu_s == 6.0
    assert [(o.pid, o.cpu_s) for o in load.other_qemu] == [(40, 6.0)]
    assert load.cpu_busy_frac == pytest.approx(0.6)
    assert load.busy
    assert any("other processes used 0.60 cores" in r for r in load.reasons)
    assert "BUSY" in load.summary()
    assert MachineLoad.from_dict(load.to_dict()) == load  # read back from a run's JSON


def test_a_reaped_process_counts_once_as_its_own_kind() -> None:
    """A lab QEMU that ran 100 s before the run and 3 s in it, then ended and was reaped
    by init (other): 3 s of lab, and init's reaped-children jump of 103 s is not other."""
    s = HZ
    qemu = proc(20, 1, 100 * s, "qemu-system-x86", start=5)
    first = snap(0.0, 0, 0, {1: proc(1, 0, 7 * s), 20: qemu}, {1: OTHER, 20: LAB}, uptime=500)
    mid = snap(
        5.0, 0, 0, {1: proc(1, 0, 7 * s), 20: proc(20, 1, 103 * s, start=5)}, {1: OTHER, 20: LAB}
    )
    last = snap(10.0, 4 * s, 0, {1: proc(1, 0, (7 + 103 + 1) * s)}, {1: OTHER})
    load = summarize([first, mid, last], "t", 2)
    assert (load.lab_cpu_s, load.other_cpu_s) == (3.0, 1.0)  # init's own second stays
    assert not load.busy


def test_a_chain_gone_in_one_interval_is_taken_off_the_survivor() -> None:
    """A shell (other) ran `timeout` running a test run with 50 s behind it; the test run
    and `timeout` both ended in the same interval: the shell's reaped-children jump holds
    both, and only what they did in the run (2 s, 0 s) counts."""
    s = HZ
    procs0 = {100: proc(100, 1, 0), 101: proc(101, 100, 1 * s), 102: proc(102, 101, 50 * s)}
    kinds = {100: OTHER, 101: OTHER, 102: OTHER}
    first = snap(0.0, 0, 0, procs0, kinds, uptime=500)
    mid = snap(5.0, 0, 0, {**procs0, 102: proc(102, 101, 52 * s)}, kinds)
    last = snap(10.0, 4 * s, 0, {100: proc(100, 1, (1 + 52) * s)}, {100: OTHER})
    load = summarize([first, mid, last], "t", 2)
    assert load.other_cpu_s == 2.0


def test_a_zombie_keeps_its_kind() -> None:
    """An exited lab QEMU, a zombie at its last sighting, is classified other there (its
    namespaces are gone): it stays lab, as first seen."""
    s = HZ
    first = snap(0.0, 0, 0, {20: proc(20, 1, 0, "qemu-system-x86")}, {20: LAB})
    last = snap(10.0, 5 * s, 0, {20: proc(20, 1, 5 * s, "qemu-system-x86")}, {20: OTHER})
    load = summarize([first, last], "t", 2)
    assert (load.lab_cpu_s, load.other_cpu_s, load.other_qemu) == (5.0, 0.0, [])


def test_summarize_quiet_run() -> None:
    s = HZ
    first = snap(0.0, 0, 0, {10: proc(10, 1, 0)}, {10: OWN})
    last = snap(10.0, 15 * s, 0, {10: proc(10, 1, 15 * s)}, {10: OWN})
    load = summarize([first, last], "t", 2)
    assert (load.busy, load.reasons, load.other_cpu_s, load.own_cpu_s) == (False, [], 0.0, 15.0)
    assert load.summary().startswith("machine quiet")


def test_summarize_needs_two_snapshots() -> None:
    with pytest.raises(ValueError, match="two snapshots"):
        summarize([snap(0.0, 0, 0, {}, {})], "t", 2)


def test_judge_thresholds() -> None:
    assert judge(10.0, 0.0, 0.0, 0.0) == []
    below = THRESHOLDS["other_cpu_cores"] * 10 - 0.1
    assert judge(10.0, 0.0, below, 0.0) == []
    (reason,) = judge(10.0, 0.0, below + 0.2, 0.0)
    assert "other processes" in reason
    (reason,) = judge(10.0, THRESHOLDS["steal_frac"], 0.0, 0.0)
    assert "steal" in reason
    assert len(judge(10.0, 0.0, 1.0, 1.0)) == 1  # another VM's 0.1 core, below the others' limit
    assert "other QEMUs" in judge(10.0, 0.0, 0.0, 1.0)[0]


#: Busy for *s* seconds of its own CPU, not of the wall: a loaded machine only stretches it.
#: It says "ready" once its interpreter is up, so a sampler can start on a busy process.
BUSY = "import time\nprint('ready', flush=True)\nwhile time.process_time() < {s}: pass\n"


def test_live_sampler_tells_its_own_child_from_an_orphan() -> None:
    """A busy child of this process is own; a busy process reparented away is other."""
    orphan = subprocess.run(
        [
            sys.executable,
            "-c",
            "import subprocess, sys\n"
            f"p = subprocess.Popen([sys.executable, '-c', {BUSY.format(s=2.5)!r}],\n"
            "    start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,\n"
            "    text=True)\n"
            "p.stdout.readline()\n"
            "print(p.pid)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan_pid = int(orphan.stdout)
    child = subprocess.Popen(
        [sys.executable, "-c", BUSY.format(s=2.5)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    try:
        with LoadSampler(interval=0.2) as sampler:
            time.sleep(1.5)
        load = sampler.record
    finally:
        child.wait()
    assert load is not None and load.samples >= 5
    assert load.own_cpu_s > 0.2
    kinds = sampler.snapshots[0].kinds  # at the start: both busy
    assert (kinds[child.pid], kinds[orphan_pid]) == (OWN, OTHER)
    assert load.other_cpu_s > 0.2
    assert sampler.stop() is load  # idempotent
    assert os.getpid() not in {o.pid for o in load.top_other}
