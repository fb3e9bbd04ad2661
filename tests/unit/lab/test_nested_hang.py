"""The nested lab's hang evidence and its reproduction loop (lab.nested.hangloop): the
parts that run without L1."""

from __future__ import annotations

import subprocess
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

import pytest

from lab.guest import domain_xml
from lab.image import BOOT_CMDLINE, GuestImage
from lab.nested.hangloop import Iteration, LoopResult, Variant, migration_due, variant
from lab.nested.image import L1_CMDLINE
from lab.nested.inside import libvirtd_report, summarize_kvm_trace, symbolize
from lab.nested.l1 import L1, qmp_socket
from lab.nested.qemu import UnpackedQemu
from lab.nested.vlab import (
    LibvirtTimeout,
    VfioLab,
    dump_words,
    exit_counter_deltas,
    interrupt_frames,
    irq_stack_link,
    is_l1_failure_under_l2,
    is_l2_hang,
    kernel_text_words,
    last_kernel_failure,
    registers,
    symbol_names,
    within,
)

#: ftrace's format as L1's 6.1 prints it; the task name has a space.
_TASK = "       CPU 0/KVM-812     [001] d..2.   431.000100: "
_INFO = " info1 0x0000000000000001 info2 0x0000000000000000 intr_info 0x00000000 error_code 0x0"
TRACE = "\n".join(
    [
        "# tracer: nop",
        "#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION",
        f"{_TASK}kvm_exit: vcpu 0 reason msr rip 0xffffffff8105a1c2{_INFO}",
        f"{_TASK}kvm_msr: msr_write 80b = 0x0",
        f"{_TASK}kvm_inj_virq: IRQ 0x21",
        f"{_TASK}kvm_exit: vcpu 0 reason msr rip 0xffffffff8105a1c2{_INFO}",
        f"{_TASK}kvm_msr: msr_write 80b = 0x0",
        f"{_TASK}kvm_exit: vcpu 0 reason vintr rip 0xffffffff81a0b3c4{_INFO}",
    ]
)


def test_a_kvm_trace_is_counted_by_exit_reason_rip_and_event() -> None:
    summary = summarize_kvm_trace(TRACE, 2.0)
    assert summary.events == {"kvm_exit": 3, "kvm_msr": 2, "kvm_inj_virq": 1}
    assert summary.exit_reasons == {"msr": 2, "vintr": 1}
    assert summary.exit_rips[("msr", "0xffffffff8105a1c2")] == 2
    assert summary.details["kvm_msr: msr_write 80b = 0x0"] == 2
    text = summary.text()
    assert "'kvm_exit': 2" in text  # per second over the 2 s window
    assert "msr@0xffffffff8105a1c2 x2" in text
    assert summarize_kvm_trace("# only a header\n", 1.0).events == {}


def test_exit_counter_deltas_are_the_growth_between_the_two_reads() -> None:
    out = (
        "/sys/kernel/debug/kvm/812-11/exits:1000\n"
        "/sys/kernel/debug/kvm/812-11/irq_exits:10\n"
        "/sys/kernel/debug/kvm/812-11/halt_exits:7\n"
        "/sys/kernel/debug/kvm/812-11/exits:4500\n"
        "/sys/kernel/debug/kvm/812-11/irq_exits:12\n"
        "grep: /sys/kernel/debug/kvm/812-11/insn_emulation: No such file or directory\n"
    )
    assert exit_counter_deltas(out) == {"exits": 3500, "irq_exits": 2}


def test_variants_combine_their_command_line_extras_and_unknown_ones_are_refused() -> None:
    assert variant("control") == Variant("control", "", "")
    assert variant("vgif0,nox2apic") == Variant("vgif0+nox2apic", "kvm_amd.vgif=0", "nox2apic")
    with pytest.raises(ValueError, match="vgif"):
        variant("vgif")
    with pytest.raises(ValueError):
        variant(" , ")
    assert variant("nox2apic,pveoi0") == Variant("nox2apic+pveoi0", "", "nox2apic", False)
    assert variant("nox2apic").l2_pv_eoi


def test_pv_eoi_is_turned_off_on_the_apic_only_when_asked(tmp_path: Path) -> None:
    off = ET.fromstring(domain_xml(GuestImage(tmp_path), tmp_path / "d.qcow2", pv_eoi=False))
    apic = off.find("features/apic")
    assert apic is not None and apic.get("eoi") == "off"
    on = ET.fromstring(domain_xml(GuestImage(tmp_path), tmp_path / "d.qcow2"))
    apic = on.find("features/apic")
    assert apic is not None and apic.get("eoi") is None


def test_l0s_monitor_is_a_qmp_socket_in_the_run_dir(tmp_path: Path) -> None:
    l1 = L1(GuestImage(tmp_path), tmp_path / "l2.raw", tmp_path, UnpackedQemu(tmp_path / "q"))
    argv = l1.argv(tmp_path / "o.qcow2")
    assert argv[argv.index("-qmp") + 1] == f"unix:{qmp_socket()},server=on,wait=off"


def test_l1_and_l2_take_the_extras_at_the_end_of_their_command_lines(tmp_path: Path) -> None:
    l1 = L1(
        GuestImage(tmp_path),
        tmp_path / "l2.raw",
        tmp_path,
        UnpackedQemu(tmp_path / "q"),
        cmdline_extra="kvm_amd.vgif=0",
    )
    argv = l1.argv(tmp_path / "o.qcow2")
    assert argv[argv.index("-append") + 1] == f"{L1_CMDLINE} kvm_amd.vgif=0"
    plain = L1(GuestImage(tmp_path), tmp_path / "l2.raw", tmp_path, UnpackedQemu(tmp_path / "q"))
    assert plain.argv(tmp_path / "o.qcow2")[argv.index("-append") + 1] == L1_CMDLINE
    xml = domain_xml(GuestImage(tmp_path), tmp_path / "d.qcow2", cmdline=f"{BOOT_CMDLINE} nox2apic")
    assert f"<cmdline>{BOOT_CMDLINE} nox2apic</cmdline>" in xml


def test_within_returns_raises_or_gives_up_on_a_call_that_does_not_return() -> None:
    assert within(5, "ok", lambda: 42) == 42
    with pytest.raises(KeyError):
        within(5, "error", lambda: {}["missing"])
    release = threading.Event()
    try:
        with pytest.raises(LibvirtTimeout, match="lookup: no answer"):
            within(0.2, "lookup", release.wait)
    finally:
        release.set()  # the abandoned thread ends


def test_the_loop_result_names_the_first_hang() -> None:
    result = LoopResult(Variant("control"), 0.0, l1_kernel="6.1.0-50-amd64")
    result.iterations = [Iteration(1, "0000:02:10.0"), Iteration(2, "0000:02:10.2")]
    result.ended = "iterations"
    assert result.hang is None and "2 iterations ok, 0 migrations, no hang" in result.summary()
    result.iterations.append(Iteration(3, "", outcome="l2-stalled", detail="ConsoleError"))
    result.ended = "l2-stalled"
    assert result.hang is not None and result.hang.number == 3
    assert "hang at iteration 3 (l2-stalled)" in result.summary()


def _fake_tools(tmp_path: Path, virsh: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "virsh").write_text(f"#!/bin/sh\n{virsh}\n")
    (bin_dir / "dmesg").write_text("#!/bin/sh\necho '[  612.5] libvirtd[269]: segfault at 0'\n")
    (bin_dir / "eu-stack").write_text(
        "#!/bin/sh\necho \"PID $2 - process\"\necho 'TID 901:'\n"
        "echo '#0  0x00007f00 __futex_abstimed_wait_common - /lib/x86_64-linux-gnu/libc.so.6'\n"
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def test_a_libvirtd_that_answers_gives_no_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{_fake_tools(tmp_path, 'exit 0')}:/usr/bin:/bin")
    monkeypatch.setenv("PTMIG_LAB_DIR", str(tmp_path / "run"))
    assert libvirtd_report("hostb", 4242, 5.0) is None


def test_a_libvirtd_that_does_not_answer_gives_its_threads_stacks_and_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", f"{_fake_tools(tmp_path, 'exec sleep 30')}:/usr/bin:/bin")
    monkeypatch.setenv("PTMIG_LAB_DIR", str(tmp_path / "run"))
    log_file = tmp_path / "run" / "hostb" / "libvirtd.log"
    log_file.parent.mkdir(parents=True)
    log_file.write_text("virNetSocketReadWire: End of file while reading data\n")
    with subprocess.Popen(["sleep", "30"]) as stuck:  # a live process stands for the daemon
        try:
            report = libvirtd_report("hostb", stuck.pid, 0.3)
        finally:
            stuck.kill()
    assert report is not None
    assert f"hostb's libvirtd (pid {stuck.pid}): virsh list did not answer in 0.3 s" in report
    assert f"--- eu-stack -p {stuck.pid} -m (exit 0)" in report
    assert "__futex_abstimed_wait_common" in report
    assert "is gone" not in report
    assert report.endswith("virNetSocketReadWire: End of file while reading data")


def test_a_libvirtd_that_is_gone_gives_its_last_words_and_l1s_kernel_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CI run met both of L1's libvirtds gone (their sockets refused): no stacks to
    take, so what it printed last and what L1's kernel said (a segfault, the OOM killer)."""
    monkeypatch.setenv("PATH", f"{_fake_tools(tmp_path, 'exit 1')}:/usr/bin:/bin")
    monkeypatch.setenv("PTMIG_LAB_DIR", str(tmp_path / "run"))
    state = tmp_path / "run" / "hostb"
    state.mkdir(parents=True)
    (state / "libvirtd.log").write_text("qemuDomainObjTaintMsg: high-privileges\n")
    (state / "libvirtd.stdout").write_text("free(): double free detected in tcache 2\n")
    with subprocess.Popen(["true"]) as ended:
        ended.wait()  # reaped: its pid is gone
    report = libvirtd_report("hostb", ended.pid, 5.0)
    assert report is not None
    assert f"--- pid {ended.pid} is gone; the tail of its stdout and stderr" in report
    assert "free(): double free detected in tcache 2" in report
    assert "libvirtd[269]: segfault at 0" in report
    assert "eu-stack" not in report
    assert report.endswith("qemuDomainObjTaintMsg: high-privileges")


def test_a_migration_comes_after_every_n_iterations_and_never_for_zero() -> None:
    assert [n for n in range(1, 11) if migration_due(n, 4)] == [5, 9]
    assert not any(migration_due(n, 0) for n in range(1, 11))
    assert [n for n in range(1, 4) if migration_due(n, 1)] == [2, 3]


#: From the control run's stall report (2026-12-05): L2 spinning with IF=0.
INFO_REGISTERS = """CPU#0
RAX=ffff8e021702300c RBX=000000000000822f RCX=ffff8e0217023138 RDX=ffff8e02170230f8
RSI=ffff8e02170230b8 RDI=ffff8e021702300c RBP=ffff8e02170230b8 RSP=ffffd4d100003d10
RIP=ffffffffab559017 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
"""


def test_the_stall_report_finds_rip_rsp_and_the_stacks_text_words() -> None:
    assert registers(INFO_REGISTERS) == {"RIP": 0xFFFFFFFFAB559017, "RSP": 0xFFFFD4D100003D10}
    dump = (
        "ffffd4d100003d10: 0xffff8e0217023138 0xffffffffab4c2b1e\n"
        "ffffd4d100003d20: 0x0000000000000002 0xffffffffab4c2b1e\n"
        "ffffd4d100003d30: 0xffffffffc0a01234 0xffffffffab60f0a1\n"
    )
    # modules (0xffffffffc...) are not kernel text; each word once, in order
    assert kernel_text_words(dump) == ["ffffffffab4c2b1e", "ffffffffab60f0a1"]


def test_l2_addresses_are_named_by_l1s_symbols_across_the_two_kaslr_bases() -> None:
    kallsyms = (
        "ffffffffaee00000 T _text\n"
        "ffffffffaef58ff0 T ktime_get_update_offsets_now\n"
        "ffffffffaef590f0 t timekeeping_advance\n"
        "ffffffffc0000000 d some_data\n"
    )
    l2_text = 0xFFFFFFFFAB400000  # the control run's L2: slide 0x2a400000
    named = symbolize(kallsyms, l2_text, [0xFFFFFFFFAB559017, 0xFFFFFFFFAB559100, 0x1000])
    assert named == [
        "ffffffffab559017 ktime_get_update_offsets_now+0x27",
        "ffffffffab559100 timekeeping_advance+0x10",
        "0000000000001000 ?",
    ]
    assert symbolize("", l2_text, [0xFFFFFFFFAB559017]) == ["ffffffffab559017 ?"]


class _Probed(VfioLab):
    """A VfioLab whose probes answer from fixed values (no L1): what each would report."""

    def __init__(
        self,
        libvirtd: str | None,
        stall: str | None,
        agent: str | Exception,
        restarted: str | None = None,
        wedged: str | None = None,
    ) -> None:
        super().__init__()
        self._said = (libvirtd, stall, agent)
        self._restarted = restarted
        self._wedged = wedged
        self.asked: list[str] = []

    def l1_console_report(self) -> str | None:
        self.asked.append("console")
        return self._wedged

    def l1_restart_report(self) -> str | None:
        self.asked.append("l1")
        return self._restarted

    def libvirtd_report(self, timeout: float = 0) -> str | None:
        self.asked.append("libvirtd")
        return self._said[0]

    def stall_report(self) -> str | None:
        self.asked.append("stall")
        return self._said[1]

    def agent_report(self) -> str:
        self.asked.append("agent")
        agent = self._said[2]
        if isinstance(agent, Exception):
            raise agent
        return agent


@pytest.mark.parametrize(
    ("wedged", "restarted", "libvirtd", "stall", "title", "asked"),
    [
        ("L1's console ran nothing", "L1 restarted", "gone", None, "L1 console report", []),
        (None, "L1 restarted", "gone", None, "L1 restart report", ["l1"]),
        (None, None, "stacks", None, "L1 libvirtd report", ["l1", "libvirtd"]),
        (None, None, None, "spinning", "L2 stall report", ["l1", "libvirtd", "stall"]),
        (None, None, None, None, "L2 agent report", ["l1", "libvirtd", "stall", "agent"]),
    ],
)
def test_evidence_is_the_first_of_l1s_console_restart_stuck_libvirtd_l2_stall_else_agent(
    wedged: str | None,
    restarted: str | None,
    libvirtd: str | None,
    stall: str | None,
    title: str,
    asked: list[str],
) -> None:
    lab = _Probed(libvirtd, stall, "agent log", restarted, wedged)
    assert [t for t, _ in lab.evidence_or_why()] == [title]
    assert lab.asked == ["console", *asked]


#: L1's console as a nested run saw it (2026-12-06 12:29, unfixed QEMU): commands' output,
#: then L1's 6.1 kernel failing in L2's vCPU thread, then its next boot.
L1_PANIC_CONSOLE = """__PTMIG_END_bc3f7b8b022e_0__
answers
[   43.173783] kvm [377]: vcpu0, guest rIP: 0xffffffff98a7e744 Unhandled WRMSR(0xc0010007) = 0xffff
[  343.837573] BUG: TASK stack guard page was hit at 00000000ab0505c7 (stack is 00000000c6c6bd1c..)
[  343.837573] stack guard page: 0000 [#1] PREEMPT SMP NOPTI
[  343.837573] CPU: 0 PID: 795 Comm: CPU 0/KVM Not tainted 6.1.0-50-amd64 #1  Debian 6.1.176-1
[  343.837573] RIP: 0010:asm_exc_page_fault+0x4/0x30
[  343.949281] Kernel panic - not syncing: corrupted stack end detected inside scheduler
[  343.950912] Kernel Offset: 0x23400000 from 0xffffffff81000000
Loading, please wait...
[    0.000000] Linux version 6.1.0-50-amd64
PTMIG-SHELL-READY 13.13
"""


def test_l1s_last_failure_is_read_from_its_console() -> None:
    lines = last_kernel_failure(L1_PANIC_CONSOLE, context=1)
    assert lines[0].endswith("Unhandled WRMSR(0xc0010007) = 0xffff")  # the context line
    assert "BUG: TASK stack guard page was hit" in lines[1]
    assert lines[-1].endswith("corrupted stack end detected inside scheduler")
    assert not any("answers" in line or "Linux version" in line for line in lines)
    quiet = "[    1.0] booted\n[    2.0] eth0 up\n"
    assert last_kernel_failure(quiet) == ["[    1.0] booted", "[    2.0] eth0 up"]


class _Rebooted(VfioLab):
    def __init__(self, boot_id: str | None) -> None:
        super().__init__()
        self.state.l1_boot_id = "11111111-1111-1111-1111-111111111111"
        self._now = boot_id

    def l1_boot_id(self) -> str | None:
        return self._now


def test_an_l1_that_booted_again_is_reported_with_its_last_kernel_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PTMIG_VLAB_DIR", str(tmp_path))
    (tmp_path / "console.log").write_text(L1_PANIC_CONSOLE)
    new = "22222222-2222-2222-2222-222222222222"
    report = _Rebooted(new).l1_restart_report()
    assert report is not None
    assert report.startswith(f"L1 restarted: boot id 11111111-1111-1111-1111-111111111111 -> {new}")
    assert "Comm: CPU 0/KVM" in report and "Kernel panic - not syncing" in report
    assert is_l1_failure_under_l2(report)  # L2's vCPU thread: the lab's layers, not ptmig
    elsewhere = L1_PANIC_CONSOLE.replace("Comm: CPU 0/KVM", "Comm: libvirtd")
    (tmp_path / "console.log").write_text(elsewhere)
    other = _Rebooted(new).l1_restart_report()
    assert other is not None and not is_l1_failure_under_l2(other)
    assert _Rebooted("11111111-1111-1111-1111-111111111111").l1_restart_report() is None
    assert _Rebooted(None).l1_restart_report() is None  # L1 silent: not known to be new


def test_evidence_that_cannot_be_had_says_why_instead_of_raising(
    capsys: pytest.CaptureFixture[str],
) -> None:
    lab = _Probed(None, None, TimeoutError("console silent"))
    lab.print_evidence()
    out = capsys.readouterr().out
    assert out.startswith("=== nested lab report\nfailed: TimeoutError: console silent"), out


#: An IRQ stack's top as 6.1 leaves it (HMP's line ends as libvirt returns them): the
#: return into sysvec_apic_timer_interrupt, then the task stack pointer it saved.
IRQ_STACK_TOP = (
    "ffffd4d100003fe0: 0xffffffffab4c2b1e 0x0000000000000000\r\n"
    "ffffd4d100003ff0: 0xffffffffabe01234 0xffffb7a0c0013e58\r\n"
)
#: pt_regs' end on the task stack: orig_ax -1, then RIP, CS, RFLAGS (IF clear), RSP, SS.
TASK_STACK = (
    "ffffb7a0c0013ee8: 0xffffffffffffffff 0xffffffffab55a3c0\n"
    "ffffb7a0c0013ef8: 0x0000000000000010 0x0000000000000046\n"
    "ffffb7a0c0013f08: 0xffffb7a0c0013f30 0x0000000000000018\n"
)


def test_the_irq_stacks_top_leads_to_the_interrupted_stack() -> None:
    assert dump_words(IRQ_STACK_TOP)[3] == (0xFFFFD4D100003FF8, 0xFFFFB7A0C0013E58)
    names = symbol_names(
        "(L1's kernel 6.1.0-50-amd64; L2's must be the same for these names)\n"
        "ffffffffab4c2b1e hrtimer_interrupt+0x11e\n"
        "ffffffffabe01234 sysvec_apic_timer_interrupt+0x74\n"
    )
    assert names[0xFFFFFFFFABE01234] == "sysvec_apic_timer_interrupt+0x74"
    assert irq_stack_link(IRQ_STACK_TOP, names) == 0xFFFFB7A0C0013E58
    # no return into an IRQ entry (an interrupt taken on the IRQ stack itself): no link
    assert irq_stack_link(IRQ_STACK_TOP, {}) is None


def test_interrupt_frames_are_found_with_their_saved_if() -> None:
    (frame,) = interrupt_frames(IRQ_STACK_TOP + TASK_STACK)
    assert (frame.at, frame.rip, frame.rflags) == (0xFFFFB7A0C0013EF0, 0xFFFFFFFFAB55A3C0, 0x46)
    assert not frame.interrupts_on
    assert "IF=0" in str(frame)
    on = interrupt_frames(TASK_STACK.replace("0x0000000000000046", "0x0000000000000246"))
    assert [f.interrupts_on for f in on] == [True]
    # a user-mode frame (CS 0x33) is not a kernel one
    assert interrupt_frames(TASK_STACK.replace("0x0000000000000010", "0x0000000000000033")) == []


def test_l2_uptime_names_the_step_where_l2_stopped_or_restarted() -> None:
    from lab.console import ExecResult
    from lab.nested.hangloop import L2Restarted, l2_uptime
    from lab.nested.vlab import VfioLabError

    class Console:
        def __init__(self, status: int, output: str) -> None:
            self.result = ExecResult(output, status)

        def exec(self, command: str, timeout: float = 60) -> ExecResult:
            return self.result

    up = Console(0, "kernel noise\n351.20\n")
    assert l2_uptime(up, "after the migration", 300.0) == 351.2  # type: ignore[arg-type]
    with pytest.raises(L2Restarted, match="restarted after the migration"):
        l2_uptime(Console(0, "18.27\n"), "after the migration", 351.2)  # type: ignore[arg-type]
    with pytest.raises(VfioLabError, match="does not answer after the whole NIC plug"):
        l2_uptime(Console(1, "timed out"), "after the whole NIC plug")  # type: ignore[arg-type]


def test_the_spins_onset_is_found_behind_its_run_of_exits_at_one_rip() -> None:
    from lab.nested.inside import spin_onset

    spin = "kvm_exit: vcpu 0 reason interrupt rip 0xffffffffa4a4f739 info1 0x0"
    entry = "kvm_entry: vcpu 0, rip 0xffffffffa4a4f739"
    led = [
        "kvm_exit: vcpu 0 reason interrupt rip 0xffffffffa4155d84 info1 0x0",
        "kvm_inj_virq: IRQ 0xec",
        "kvm_entry: vcpu 0, rip 0xffffffffa4155d84",
    ]
    events = ["kvm_exit: vcpu 0 reason msr rip 0xffffffff8105a1c2"] + led + [spin, entry] * 5
    before, start = spin_onset(events, before=3)
    assert before == led and events[start] == spin


#: The head of a stall report CI printed (2026-12-06, the Nova-style test): L2 spinning in
#: handle_edge_irq's lock with interrupts off.
CI_HANG = """L2 does not answer (L2's console command failed)
L2 vCPU time over 1 s on hosta: 1.23 s
--- (qemu) info registers
CPU#0
RAX=0000000000000101 RBX=ffff8ccc026ec2a4 RCX=ffffffffae801220 RDX=0000000000000000
RIP=ffffffffae64f739 RFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0
"""


@pytest.mark.parametrize(
    ("change", "hang"),
    [
        (lambda r: r, True),
        (lambda r: r.replace("RFL=00000002", "RFL=00000202"), False),  # IF=1: not that hang
        (lambda r: r.replace("1.23 s", "0.02 s"), False),  # halted, not spinning
        (lambda r: r.replace("CPL=0", "CPL=3"), False),  # in user space
        (lambda r: r.replace("L2 does not answer", "L2 answers"), False),
        (lambda r: r.split("--- (qemu) info registers")[0], False),  # no registers read
    ],
)
def test_the_l2_hang_is_told_by_a_silent_spinning_l2_kernel_with_interrupts_off(
    change: Callable[[str], str], hang: bool
) -> None:
    assert is_l2_hang(change(CI_HANG)) is hang


def test_an_l2_reset_during_a_test_is_told_by_its_boot_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """``mark_boot`` then ``restart_report``: a changed boot id is a reset; the same one,
    or one that cannot be read, is not."""
    answers = iter(
        [
            "cat ...\n0b7d3e4c-1f2a-4b5c-8d9e-0123456789ab\n",  # mark_boot
            "0b7d3e4c-1f2a-4b5c-8d9e-0123456789ab\n",  # same boot: no report
            "9f8e7d6c-5b4a-4392-8170-fedcba987654\n",  # booted again
            "12.34\n",  # its uptime
        ]
    )
    from lab.console import ExecResult

    lab = VfioLab()
    monkeypatch.setattr(lab, "exec", lambda *_a, **_k: ExecResult(next(answers), 0))
    lab.mark_boot()
    assert lab.boot_at_start == "0b7d3e4c-1f2a-4b5c-8d9e-0123456789ab"
    assert lab.restart_report() is None
    report = lab.restart_report()
    assert report is not None and "-> 9f8e7d6c-5b4a-4392-8170-fedcba987654" in report
    assert "uptime now 12.34 s" in report
    monkeypatch.setattr(lab, "exec", lambda *_a, **_k: ExecResult("no console", 1))
    assert lab.restart_report() is None
