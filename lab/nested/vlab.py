"""The nested vfio lab as one object, driven from L0: up, down, status, exec.

ptmig's coordinator stays on L0 and reaches each host's libvirtd inside L1 as
``qemu+tcp://127.0.0.1:<port>/system`` (QEMU user networking forwards the loopback
port); peer-to-peer migration between the hosts uses their L1-internal addresses
(``qemu+tcp://192.0.2.x/system``, ``--peer-uri``), and the agent is reached through
virDomainOpenChannel over the same connection.  Commands for L1 go over its serial
console; commands for L2 go over L1's console to L2's (``lab.nested.inside exec``).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from host.hypervisor.events import ensure_event_loop
from lab import STANDBY_MAC, WAN_STANDBY_MAC
from lab.console import ConsoleError, ExecResult, GuestConsole
from lab.fabric import HOSTS
from lab.guest import DOMAIN_NAME, domain_xml
from lab.image import BOOT_CMDLINE, GuestImage
from lab.nested import LIBVIRT_PORTS, UPLINK_IPS, run_dir
from lab.nested.guest import l2_init
from lab.nested.image import build_l1, build_l2, build_l2_initrd
from lab.nested.l1 import L1, UPLINK_MAC, WIRE_NICS, l1_vcpus, running_pid, src_path
from lab.nested.mdev import MTTY_TYPES
from lab.nested.qemu import UnpackedQemu, build_qemu
from lab.traffic import Phase
from lab.vmlab import BAD_KERNEL_LINES

log = logging.getLogger(__name__)

#: Where L1 sees the share (kernel and initramfs of L2) and L2's root disk.
L2_IN_L1 = Path("/mnt/vlab/l2")
L2_DISK_DEV = "/dev/vdb"
L2_OVERLAY = "/var/tmp/ptmig-lab/guest/disk.qcow2"
L2_BOOT_TIMEOUT = 900.0
L2_MEMORY_MIB = 384
L2_VCPUS = 1

#: Whether L2 is offered PV EOI.  Yes: without it the L2 hang came as a panic instead of a
#: deadlock, later but not gone (docs/lab.md, "The cause ... reproduced on demand").
L2_PV_EOI = True

#: The agent's teams in L2.  Team wan is agent-owned with no primary at start: its whole
#: NIC is plugged by ptmig from the host's pci pool.
AGENT_CONFIG = f"""# ptmig nested lab guest (L2)
[[teams]]
name = "lan"
bond = "bond0"
standby = {{mac = "{STANDBY_MAC}"}}
mac_policy = "preserve"
ownership = "admin"

[[teams]]
name = "wan"
bond = "bond1"
standby = {{mac = "{WAN_STANDBY_MAC}"}}
mac_policy = "preserve"
ownership = "agent"
mac = "{WAN_STANDBY_MAC}"
"""


#: What L1's QEMU is asked when L2 stops answering (docs/lab.md, "L2 hung after a VF
#: hot-plug"): where the vCPU is, its local APIC, the IOAPIC, and ICH9's GPE0 status and
#: enable registers (PMBASE 0x600 + 0x20 and + 0x28): is a hot-plug's ACPI event holding
#: the level-triggered SCI up?
STALL_MONITOR_COMMANDS = (
    "info registers",
    "info lapic",
    "info pic",
    "i /w 0x620",  # HMP's 32-bit size is w ("i /l" is refused: invalid char in format)
    "i /w 0x624",
    "i /w 0x628",
    "i /w 0x62c",
)
#: How much of L2's kernel stack the stall report dumps (``x /<n>gx RSP``): enough to hold
#: the interrupt frame of a handler that spins (its saved RFLAGS says whether the
#: interrupt came in with IF set) and the interrupted code's return addresses.
STALL_STACK_WORDS = 96
_REGISTER = re.compile(r"\b(RIP|RSP)=([0-9a-f]{16})\b")
#: Kernel text on x86-64 (KASLR places it in [0xffffffff80000000, 0xffffffffc0000000)).
_KERNEL_TEXT = re.compile(r"\b0x(ffffffff[89ab][0-9a-f]{7})\b")


#: Loadable modules on x86-64 ([0xffffffffc0000000, 0xffffffffff000000)): a spin seen in
#: module text (stop 31: RIP ffffffffc0b5a13c) is named by the module's own symbols.
_MODULE_TEXT = re.compile(r"\b0x(ffffffff[c-e][0-9a-f]{7})\b")
#: ``grep -H . /sys/module/*/sections/.text*``'s lines in L2.
_MODULE_SECTION = re.compile(r"^/sys/module/([\w-]+)/sections/(\.text[\w.]*):(0x[0-9a-f]+)$", re.M)
#: Read in L2 once it booted (its modules are all loaded by then: lab.nested.guest).
MODULE_SECTIONS_COMMAND = "grep -H . /sys/module/*/sections/.text* 2>/dev/null || true"


def module_sections(output: str) -> dict[str, str]:
    """``"module/section"`` -> base (hex) from :data:`MODULE_SECTIONS_COMMAND`'s output;
    bases of 0 (hidden by kptr_restrict) are left out."""
    return {
        f"{name}/{section}": base
        for name, section, base in _MODULE_SECTION.findall(output)
        if int(base, 16)
    }


def module_text_words(dump: str) -> list[str]:
    """The words of an HMP ``x /gx`` dump that point into module text, once each."""
    return list(dict.fromkeys(_MODULE_TEXT.findall(dump)))


def registers(info: str) -> dict[str, int]:
    """RIP and RSP from HMP's ``info registers``."""
    return {name: int(value, 16) for name, value in _REGISTER.findall(info)}


_BOOT_ID = re.compile(r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\s*$", re.M)
_STALL_CPU = re.compile(r"^L2 vCPU time over 1 s on \w+: ([\d.]+) s$", re.M)
_STALL_FLAGS = re.compile(r"\bRFL=([0-9a-f]+) .*\bCPL=(\d)")
#: The first line of :class:`HangWatch`'s report.
SPIN_HEADER = "L2 spins in its kernel with interrupts off"


def is_l2_hang(report: str) -> bool:
    """Whether a stall report (:meth:`VfioLab.stall_report`, or :class:`HangWatch`'s)
    shows the nested lab's L2 hang (docs/lab.md, "The frame read"): L2 silent on its
    console (or seen spinning at one place by the watch), its vCPU busy (half a second a
    second or more) in its kernel (CPL 0) with interrupts off (IF=0): an interrupt
    delivered below L2's kernel while it had them off, where none of ptmig's code runs."""
    cpu, flags = _STALL_CPU.search(report), _STALL_FLAGS.search(report)
    return bool(
        report.startswith(("L2 does not answer", SPIN_HEADER))
        and cpu is not None
        and float(cpu[1]) >= 0.5
        and flags is not None
        and not int(flags[1], 16) & 0x200
        and flags[2] == "0"
    )


#: A vCPU thread of L2's QEMU as L1's kernel names it: an oops's "Comm:", a soft
#: lockup's "[comm:pid]".
_KVM_VCPU_THREAD = re.compile(r"Comm: CPU \d+/KVM |\[CPU \d+/KVM:\d+\]")


def is_l1_failure_under_l2(report: str) -> bool:
    """Whether an L1 restart report (:meth:`VfioLab.l1_restart_report`), or the report of
    an L1 whose console runs nothing (:meth:`VfioLab.l1_console_report`), shows L1's
    kernel failing in a vCPU thread of L2's QEMU (``Comm: CPU n/KVM``): L1's KVM running
    L2 on L0's emulated SVM, the layers the L2 hang lives in, where none of ptmig's code
    runs (a nested run of 2026-12-06 on the unfixed QEMU: a stack overflow in L1's
    page-fault entry in that thread, then a panic)."""
    return report.startswith(("L1 restarted", L1_SILENT)) and bool(_KVM_VCPU_THREAD.search(report))


@dataclass(frozen=True)
class SpinSample:
    """One look at L2's vCPU from L1's libvirt (no console): its CPU time so far, and
    RIP, RFLAGS and CPL from ``info registers``."""

    at: float
    cpu_s: float
    rip: int
    rflags: int
    cpl: int
    registers: str


#: A spin is at one place: every sample's RIP within this many bytes of the first's (the
#: spins seen: a ``pause`` loop of 9-16 bytes in one function).
SPIN_SPAN = 0x100
#: Samples, and seconds between them, that make a spin: three, 5 s apart (10 s of
#: spinning at one RIP with interrupts off, far past any critical section of a healthy
#: kernel, which the soft-lockup detector would call a bug at 20 s).
SPIN_SAMPLES = 3
SPIN_PERIOD_S = 5.0


def is_spinning(samples: list[SpinSample]) -> bool:
    """Whether the last SPIN_SAMPLES samples show L2 stuck as in the L2 hang: in its
    kernel (CPL 0), interrupts off (IF=0), its vCPU busy (half a second a second or
    more) and its RIP at one place (SPIN_SPAN)."""
    last = samples[-SPIN_SAMPLES:]
    if len(last) < SPIN_SAMPLES:
        return False
    if any(s.cpl != 0 or s.rflags & 0x200 for s in last):
        return False
    if any(abs(s.rip - last[0].rip) > SPIN_SPAN for s in last):
        return False
    return all(
        b.at > a.at and (b.cpu_s - a.cpu_s) / (b.at - a.at) >= 0.5
        for a, b in itertools.pairwise(last)
    )


def kernel_text_words(dump: str) -> list[str]:
    """The words of an HMP ``x /gx`` dump that point into kernel text (return addresses,
    a saved RIP), in order, once each."""
    return list(dict.fromkeys(_KERNEL_TEXT.findall(dump)))


#: Words dumped where an interrupt on the IRQ stack came from: the C entry's frame, its
#: return into the asm entry and pt_regs (21 words) with the CPU's frame at its end.
STALL_LINK_WORDS = 48
_DUMP_LINE = re.compile(r"^([0-9a-f]{16}):((?:\s+0x[0-9a-f]{16})+)\s*$", re.M)
#: The C entries that switch to the IRQ stack (call_on_irqstack in 6.1's
#: arch/x86/include/asm/irq_stack.h), as L1's kallsyms names them.
_IRQ_ENTRY = re.compile(r"^(sysvec_\w+|common_interrupt|spurious_interrupt)\+0x")
#: Linux x86-64's kernel code and data segments, as the CPU pushes them for CPL 0.
_KERNEL_CS, _KERNEL_SS = 0x10, 0x18


def dump_words(dump: str) -> list[tuple[int, int]]:
    """(address, value) of every word of an HMP ``x /gx`` dump, in order."""
    words = []
    for m in _DUMP_LINE.finditer(dump):
        base = int(m.group(1), 16)
        for i, value in enumerate(m.group(2).split()):
            words.append((base + 8 * i, int(value, 16)))
    return words


def irq_stack_link(dump: str, names: dict[int, str]) -> int | None:
    """The interrupted stack pointer that call_on_irqstack saved at the IRQ stack's top,
    the word just above the return address into the C entry (*names*: words by
    symbol): the way to the pt_regs on the task stack, which a dump of the IRQ stack
    does not reach.  None if the dump holds no such return address."""
    words = [v for _, v in dump_words(dump)]
    for i, value in enumerate(words[:-1]):
        if _IRQ_ENTRY.match(names.get(value, "")) and words[i + 1] >> 48 == 0xFFFF:
            return words[i + 1]
    return None


@dataclass(frozen=True)
class InterruptFrame:
    """What the CPU pushed when an interrupt or exception came in at CPL 0."""

    at: int
    rip: int
    rflags: int
    rsp: int

    @property
    def interrupts_on(self) -> bool:
        return bool(self.rflags & 0x200)

    def __str__(self) -> str:
        flag = "IF=1" if self.interrupts_on else "IF=0"
        return (
            f"frame at {self.at:016x}: RIP={self.rip:016x} RFLAGS={self.rflags:08x} ({flag}) "
            f"RSP={self.rsp:016x}"
        )


def interrupt_frames(dump: str) -> list[InterruptFrame]:
    """The hardware frames (RIP in kernel text, CS 0x10, RFLAGS, RSP, SS 0x18 or 0) in an
    ``x /gx`` dump: pt_regs' last five words.  RFLAGS' IF is the decisive bit: clear, the
    interrupt was delivered while the interrupted code had interrupts off."""
    words = dump_words(dump)
    frames = []
    for i in range(len(words) - 4):
        rip, cs, flags, rsp, ss = (v for _, v in words[i : i + 5])
        if (
            _KERNEL_TEXT.fullmatch(f"0x{rip:016x}")
            and cs == _KERNEL_CS
            and flags & 0x2
            and flags < 1 << 22
            and rsp >> 48 == 0xFFFF
            and ss in (0, _KERNEL_SS)
        ):
            frames.append(InterruptFrame(words[i][0], rip, flags, rsp))
    return frames


def symbol_names(output: str) -> dict[int, str]:
    """``lab.nested.inside symbolize``'s lines (address, name) by address."""
    names = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and re.fullmatch(r"[0-9a-f]{16}", parts[0]):
            names[int(parts[0], 16)] = parts[1]
    return names


#: L1's KVM counters for every VM it runs (L2 is the only one), by debugfs.
KVM_EXIT_COUNTERS = (
    "/sys/kernel/debug/kvm/*-*/{"
    + ",".join(
        (
            "exits",
            "irq_exits",
            "irq_window_exits",
            "nmi_window_exits",
            "halt_exits",
            "insn_emulation",
            "insn_emulation_fail",
            "request_irq_exits",
            "irq_injections",
        )
    )
    + "}"
)
#: How long L2 may take to answer ``true`` on its console before it counts as stalled.
STALL_PROBE_S = 20.0
#: How long L1's first console may take to run ``true`` before it counts as wedged, and
#: how the report of one that did not begins.
L1_PROBE_S = 20.0
L1_SILENT = "L1's console ran nothing"
#: How long L1's second console may take over L1_CONSOLE_REPORT.
L1_REPORT_S = 60.0
#: An L1 command is sent TERM this many seconds before its console gives up on it, and
#: KILL L1_KILL_AFTER_S later (VfioLab.l1_exec).
L1_EXEC_MARGIN_S = 8.0
L1_KILL_AFTER_S = 3.0
#: What L1's second console (ttyS1, a shell of its own) runs when the first one does not
#: answer: what the first one's shell is running (each process on ttyS0 with its state,
#: wait channel and kernel stack), every process in uninterruptible sleep, and the
#: kernel's last lines.  Shell and procps only: a python3 that reads this checkout over
#: 9p could be what is stuck.
L1_CONSOLE_REPORT = (
    "echo \"uptime $(cut -d' ' -f1 /proc/uptime) s, load $(cut -d' ' -f1-3 /proc/loadavg)\"; "
    "echo '--- on ttyS0'; ps -t ttyS0 -o pid,ppid,stat,wchan:32,etime,args; "
    "for p in $(ps -t ttyS0 -o pid=); do "
    'echo "--- $p\'s kernel stack"; cat /proc/$p/stack 2>&1; done; '
    "echo '--- in uninterruptible sleep'; ps -eo pid,stat,wchan:32,etime,args | awk '$2 ~ /D/'; "
    "echo '--- the kernel log, last lines'; dmesg | tail -n 30"
)
#: How long L1's KVM is traced for a stall report (lab.nested.inside.kvm_trace).
STALL_TRACE_S = 2.0
#: How long a host's libvirtd may take to answer ``virsh list`` in L1 before its threads'
#: stacks are taken (lab.nested.inside.libvirtd_report).
LIBVIRTD_PROBE_S = 20.0
#: What L2 runs for `VfioLab.agent_report` (its init loop restarts the agent into that log).
AGENT_REPORT = (
    "pgrep -af ptmig-agent; echo '--- /run/ptmig-agent.log, last 40 lines'; "
    "tail -n 40 /run/ptmig-agent.log; echo '--- /dev/virtio-ports'; ls -l /dev/virtio-ports/; "
    "echo '--- links'; ip -br link; echo '--- bonds'; "
    "grep -H . /sys/class/net/bond*/bonding/active_slave /sys/class/net/bond*/bonding/slaves"
)
KVM_AMD_PARAMETERS = "/sys/module/kvm_amd/parameters/{nested,npt,vgif,avic,nrips,vls}"
_COUNTER = re.compile(r"^/sys/kernel/debug/kvm/[^/]+/(\w+):(\d+)$")


def exit_counter_deltas(output: str) -> dict[str, int]:
    """How much each of L1's KVM counters grew between the stall report's two reads
    (``grep -H`` lines, first read then second); a counter read once is left out."""
    reads: dict[str, list[int]] = {}
    for line in output.splitlines():
        m = _COUNTER.match(line.strip())
        if m:
            reads.setdefault(m.group(1), []).append(int(m.group(2)))
    return {name: v[-1] - v[0] for name, v in reads.items() if len(v) >= 2}


class VfioLabError(RuntimeError):
    """A step of the nested lab failed; the message names the console log."""


T = TypeVar("T")


class LibvirtTimeout(VfioLabError):
    """A call into L1 (libvirt, or a console through it) did not return in time."""


def within(seconds: float, what: str, call: Callable[[], T]) -> T:
    """*call* in a thread, given up after *seconds*: a libvirt call blocked in C cannot be
    interrupted, so the thread is left behind (the lab goes down after a hang anyway)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    worker = threading.Thread(target=run, name=f"within: {what}", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise LibvirtTimeout(f"{what}: no answer in {seconds:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


@dataclass
class HostDevices:
    """What one host's pools are made of, as L1 reported it."""

    pid: int
    pf: str
    pf_pci: str
    vfs: list[str]
    whole: str
    whole_pci: str
    #: Whether the VFs answer at their BARs (lab.nested.inside.vf_bar_decodes).
    vf_bar_decodes: bool = True


@dataclass
class VfioLabState:
    hosts: dict[str, HostDevices] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: L0's QEMU that runs L1 (lab.nested.qemu), as its --version says.
    qemu: str = ""
    #: The fixes applied to that QEMU's binary and what became of each
    #: (lab.nested.qemu.BINARY_FIXES: the L2 hang's cause is one).
    qemu_fixes: dict[str, str] = field(default_factory=dict)
    #: L1's ``uname -r`` (lab.nested.kernel: 6.1 by default, 6.12 opt-in).
    l1_kernel: str = ""
    #: L1's boot id as the lab came up: another one later means L1 restarted (its kernel
    #: panicked: it boots with panic=-1), and every daemon and guest in it is gone.
    l1_boot_id: str = ""
    #: L1's vCPUs (lab.nested.l1.l1_vcpus).
    l1_vcpus: int = 0
    #: Whether L1 has the mtty mdev parent (6.12 only): the hybrid path's migratable device.
    mtty: bool = False
    #: L1's /proc/cmdline and kvm_amd's parameters in effect (/sys/module/kvm_amd/parameters),
    #: and L2's kernel command line: what a hang measurement ran under (lab.nested.hangloop).
    l1_cmdline: str = ""
    kvm_amd: dict[str, str] = field(default_factory=dict)
    l2_cmdline: str = ""
    #: Whether L2 is offered PV EOI (L2_PV_EOI, or a hangloop variant's choice): a restart
    #: after the L2 hang boots L2 the same way.
    l2_pv_eoi: bool = True
    #: L2's ``_text`` (its KASLR base, hex), read once it booted: with it the stall
    #: report names L2's RIP and stack words by L1's kallsyms (the same 6.1 kernel).
    l2_text: str = ""
    #: L2's module sections (:func:`module_sections`), read with ``l2_text``: the stall
    #: report names a module address by L1's copy of that module.
    l2_modules: dict[str, str] = field(default_factory=dict)

    @staticmethod
    def path() -> Path:
        return run_dir() / "state.json"

    @classmethod
    def load(cls) -> VfioLabState | None:
        try:
            data = json.loads(cls.path().read_text())
        except FileNotFoundError:
            return None
        return cls(
            hosts={k: HostDevices(**v) for k, v in data["hosts"].items()},
            timings=data["timings"],
            qemu=data.get("qemu", ""),
            qemu_fixes=data.get("qemu_fixes", {}),
            l1_kernel=data.get("l1_kernel", ""),
            l1_boot_id=data.get("l1_boot_id", ""),
            mtty=data.get("mtty", False),
            l1_cmdline=data.get("l1_cmdline", ""),
            kvm_amd=data.get("kvm_amd", {}),
            l2_cmdline=data.get("l2_cmdline", ""),
            l2_pv_eoi=data.get("l2_pv_eoi", True),
            l2_text=data.get("l2_text", ""),
            l2_modules=data.get("l2_modules", {}),
        )

    def save(self) -> None:
        self.path().write_text(json.dumps(asdict(self), indent=1))


def uri(host: str) -> str:
    """A host's libvirtd as L0 reaches it."""
    return f"qemu+tcp://127.0.0.1:{LIBVIRT_PORTS[host]}/system"


def peer_uri(host: str) -> str:
    """A host's libvirtd as the other host reaches it (inside L1)."""
    return f"qemu+tcp://{next(h.migration_ip for h in HOSTS if h.name == host)}/system"


def bounded(script: str, timeout: float) -> str:
    """*script* as a console command that ends itself (TERM, then KILL) L1_EXEC_MARGIN_S
    before a console that waits *timeout* seconds gives up on it."""
    bound = max(timeout - L1_EXEC_MARGIN_S, 1.0)
    return f"timeout -k {L1_KILL_AFTER_S:g} {bound:g} bash -c {shlex.quote(script)}"


def _read_boot_id(run: Callable[..., ExecResult]) -> str | None:
    """A kernel's boot id through *run* (a console's command runner); None if unread."""
    try:
        out = run("cat /proc/sys/kernel/random/boot_id", timeout=STALL_PROBE_S)
    except Exception:  # not answering: no boot id
        return None
    found = _BOOT_ID.findall(out.output) if out.status == 0 else []
    return found[-1] if found else None


#: A kernel's report of its own failure, as a console shows it.
_KERNEL_FAILURE = re.compile(r"Kernel panic|BUG:|Oops:|general protection|watchdog:")
_KERNEL_LINE = re.compile(r"^\[\s*\d+\.\d+\]")


def last_kernel_failure(console: str, context: int = 10) -> list[str]:
    """The kernel lines of *console* that tell its last failure: that episode's failure
    lines (each within 40 lines of the next) and what lies between them, with *context*
    kernel lines ahead; the last 40 kernel lines if it shows no failure."""
    lines = [line for line in console.splitlines() if _KERNEL_LINE.match(line)]
    failing = [i for i, line in enumerate(lines) if _KERNEL_FAILURE.search(line)]
    if not failing:
        return lines[-40:]
    first = len(failing) - 1
    while first > 0 and failing[first] - failing[first - 1] <= 40:
        first -= 1
    return lines[max(0, failing[first] - context) : failing[-1] + 1]


class VfioLab:
    def __init__(self, l1_kernel: str | None = None) -> None:
        """*l1_kernel*: L1's kernel for this lab (lab.nested.kernel.L1_KERNELS; None:
        ``$PTMIG_VLAB_L1_KERNEL`` or the default)."""
        self.state = VfioLabState.load() or VfioLabState()
        self.l1_kernel = l1_kernel
        self._conns: dict[str, libvirt.virConnect] = {}
        #: L2's boot id when the running test began (:meth:`mark_boot`), None: not read.
        self.boot_at_start: str | None = None

    @property
    def l1_console(self) -> GuestConsole:
        return GuestConsole(run_dir() / "console.sock", run_dir() / "console.log")

    @property
    def l1_console2(self) -> GuestConsole:
        """L1's second console (ttyS1): a shell of its own, for looking at the first."""
        return GuestConsole(run_dir() / "console2.sock", run_dir() / "console2.log")

    # -- lifecycle ---------------------------------------------------------------------

    def prepare(self) -> tuple[GuestImage, GuestImage, UnpackedQemu]:
        """Build (or reuse) both images, L2's initramfs and L0's QEMU; no VM runs yet, so
        no lock."""
        if running_pid() is not None:
            raise VfioLabError("the vfio lab is up already: run 'ptmig-lab down --vfio' first")
        qemu = build_qemu()
        l1_image, l2_image = build_l1(self.l1_kernel), build_l2()
        share = run_dir() / "share" / "l2"
        if share.exists():
            shutil.rmtree(share)
        share.mkdir(parents=True)
        shutil.copy2(l2_image.kernel, share / "vmlinuz")
        build_l2_initrd(l1_image, l2_image, l2_init(AGENT_CONFIG), share / "initrd.img")
        (run_dir() / "images.json").write_text(
            json.dumps(
                {
                    "l1": str(l1_image.directory),
                    "l2": str(l2_image.directory),
                    "qemu": str(qemu.root),
                }
            )
        )
        return l1_image, l2_image, qemu

    def up(
        self,
        *,
        boot_guest: bool = True,
        prepared: bool = False,
        l1_cmdline_extra: str = "",
        l2_cmdline_extra: str = "",
        l2_pv_eoi: bool | None = None,
    ) -> None:
        """Start L1 and its hosts, then (*boot_guest*) L2; *prepared*: prepare() ran.
        The extras go at the end of L1's and L2's kernel command lines (the hang
        mitigations lab.nested.hangloop measures, e.g. ``kvm_amd.vgif=0``, ``nox2apic``)."""
        t0 = time.monotonic()
        if prepared:
            paths = json.loads((run_dir() / "images.json").read_text())
            l1_image, l2_image = GuestImage(Path(paths["l1"])), GuestImage(Path(paths["l2"]))
            qemu = UnpackedQemu(Path(paths["qemu"]))
        else:
            l1_image, l2_image, qemu = self.prepare()
        self.state = VfioLabState(qemu=qemu.version, qemu_fixes=qemu.fixes)
        self.state.timings["images_s"] = round(time.monotonic() - t0, 1)
        self.state.l1_vcpus = l1_vcpus()
        l1 = L1(
            l1_image,
            l2_image.disk,
            src_path(),
            qemu,
            cmdline_extra=l1_cmdline_extra,
            vcpus=self.state.l1_vcpus,
        )
        self.state.timings["l1_boot_s"] = round(l1.start(), 1)
        self.state.save()
        try:
            self.state.l1_kernel = self.l1_exec("uname -r").check().strip()
            self.state.l1_boot_id = self.l1_boot_id() or ""
            self.state.mtty = (
                self.l1_exec(f"test -d {MTTY_TYPES} && echo yes || echo no").check().strip()
                == "yes"
            )
            self.state.l1_cmdline = self.l1_exec("cat /proc/cmdline").check().strip()
            self.state.kvm_amd = dict(
                line.rsplit("/", 1)[-1].split(":", 1)
                for line in self.l1_exec(f"grep -H . {KVM_AMD_PARAMETERS} 2>/dev/null || true")
                .check()
                .split()
                if ":" in line
            )
            t1 = time.monotonic()
            wires: dict[str, dict[str, str]] = {h: {} for h in LIBVIRT_PORTS}
            for nic in WIRE_NICS:
                wires[nic.host][nic.model] = nic.mac
            spec = {"wires": wires, "uplink_mac": UPLINK_MAC, "uplink_ips": UPLINK_IPS}
            out = self.l1_exec(
                f"python3 -m lab.nested.inside up {shlex.quote(json.dumps(spec))}", timeout=300
            ).check()
            info = json.loads(out.strip().splitlines()[-1])
            self.state.hosts = {h: HostDevices(**v) for h, v in info.items()}
            self.state.timings["hosts_s"] = round(time.monotonic() - t1, 1)
            self.state.save()
            if boot_guest:
                self.boot_guest(l2_cmdline_extra, pv_eoi=l2_pv_eoi)
        except BaseException:
            log.error("vfio lab start failed; L1 console log: %s", run_dir() / "console.log")
            raise

    def boot_guest(
        self,
        cmdline_extra: str = "",
        *,
        extra_devices: str = "",
        qemu_override: str = "",
        pv_eoi: bool | None = None,
    ) -> float:
        """Boot L2 on hosta (no passthrough device but *extra_devices*, e.g. an mdev, with
        *qemu_override*); return seconds until its shell.  *cmdline_extra* goes at the end
        of its kernel command line; *pv_eoi*: whether L2 is offered PV EOI (None:
        L2_PV_EOI)."""
        pv_eoi = L2_PV_EOI if pv_eoi is None else pv_eoi
        self.l1_exec(
            f"mkdir -p {Path(L2_OVERLAY).parent} && rm -f {L2_OVERLAY} && "
            f"qemu-img create -q -f qcow2 -b {L2_DISK_DEV} -F raw {L2_OVERLAY}"
        ).check()
        xml = domain_xml(
            GuestImage(L2_IN_L1),
            Path(L2_OVERLAY),
            with_primary=False,
            memory_mib=L2_MEMORY_MIB,
            vcpus=L2_VCPUS,
            domain_type="kvm" if self.accel() == "kvm" else "qemu",
            cmdline=f"{BOOT_CMDLINE} {cmdline_extra}".strip(),
            extra_devices=extra_devices,
            qemu_override=qemu_override,
            pv_eoi=pv_eoi,
        )
        self.state.l2_cmdline = f"{BOOT_CMDLINE} {cmdline_extra}".strip()
        self.state.l2_pv_eoi = pv_eoi
        since = int(self.inside("console-size", "hosta").check().strip() or 0)
        dom = self.conn("hosta").defineXML(xml)
        t0 = time.monotonic()
        dom.create()
        self.inside(
            "wait-shell", "hosta", str(since), str(L2_BOOT_TIMEOUT), timeout=L2_BOOT_TIMEOUT + 30
        ).check()
        took = time.monotonic() - t0
        self.state.timings["l2_boot_s"] = round(took, 1)
        self.state.timings["dmesg_baseline"] = self.bad_kernel_lines()
        text = self.exec("grep -m1 ' _text$' /proc/kallsyms || true").output.split()
        # all zeros where kptr_restrict hides it: then unknown
        self.state.l2_text = text[0] if text and int(text[0], 16) else ""
        self.state.l2_modules = module_sections(self.exec(MODULE_SECTIONS_COMMAND).output)
        self.state.save()
        log.info("L2 booted on hosta in %.1f s", took)
        return took

    def boot_id(self) -> str | None:
        """L2's ``/proc/sys/kernel/random/boot_id`` over its console; None if unread."""
        return _read_boot_id(self.exec)

    def mark_boot(self) -> None:
        """Remember L2's boot id as a test begins (for :meth:`restart_report`)."""
        self.boot_at_start = self.boot_id()

    def restart_report(self) -> str | None:
        """If L2 booted again since :meth:`mark_boot` (a reset: docs/lab.md, "The cause"),
        what says so; else None (also when either boot id is unknown)."""
        now = self.boot_id()
        if self.boot_at_start is None or now is None or now == self.boot_at_start:
            return None
        uptime = self.exec("cut -d' ' -f1 /proc/uptime", timeout=STALL_PROBE_S).output.strip()
        return (
            f"L2 restarted during the test: boot id {self.boot_at_start} -> {now}, "
            f"uptime now {uptime.splitlines()[-1] if uptime else '?'} s"
        )

    def l1_boot_id(self) -> str | None:
        """L1's boot id over its console; None if unread."""
        return _read_boot_id(self.l1_exec)

    def l1_restart_report(self, now: str | None = None) -> str | None:
        """If L1 booted again since the lab came up, what says so: both boot ids and the
        last kernel lines its console printed before (a panic's, when it panicked); else
        None (also when a boot id is unknown).  *now*: L1's boot id if the caller just read
        it.  Stop 32's CI read such an L1 as "both libvirtds gone" and a connection that
        never answered."""
        now = now or self.l1_boot_id()
        if not self.state.l1_boot_id or now is None or now == self.state.l1_boot_id:
            return None
        console = self.l1_console.log_file
        text = console.read_text(errors="replace") if console.exists() else ""
        return (
            f"L1 restarted: boot id {self.state.l1_boot_id} -> {now}; every libvirtd and "
            f"guest of the lab went with it.  The last kernel lines before ({console}):\n"
            + "\n".join(last_kernel_failure(text))
        )

    def l1_answers(self) -> bool:
        """Whether L1's first console runs a command within L1_PROBE_S."""
        try:
            return self.l1_console.run("true", timeout=L1_PROBE_S).status == 0
        except ConsoleError:
            return False

    def l1_console_report(self) -> str | None:
        """None while L1's console runs a command within L1_PROBE_S; else what L1's second
        console shows of it (L1_CONSOLE_REPORT), or, when that is silent too, L0's copy of
        L1's last kernel lines: a kernel that runs no shell.  Stop 35's CI met a console
        that ran nothing more after a failed test, and each following test waited out
        its commands' timeouts on it (2 failures and 4 errors, 23 minutes)."""
        if self.l1_answers():
            return None
        head = f"{L1_SILENT} in {L1_PROBE_S:g} s"
        try:
            seen = self.l1_console2.run(L1_CONSOLE_REPORT, timeout=L1_REPORT_S).output
        except ConsoleError as exc:
            log = self.l1_console.log_file
            text = log.read_text(errors="replace") if log.exists() else ""
            return (
                f"{head}, nor its second console ({str(exc).splitlines()[0]}); L1's last "
                f"kernel lines ({log}):\n" + "\n".join(last_kernel_failure(text))
            )
        # ttyS1's shell echoes what is typed (and readline's escapes): the report begins
        # at its first line
        seen = seen[seen.find("uptime ") :] if "uptime " in seen else seen
        return f"{head}; its second console (ttyS1) saw:\n{seen.strip()}"

    def answers(self) -> bool:
        """Whether L2 runs its console's commands (within STALL_PROBE_S)."""
        try:
            return self.exec("true", timeout=STALL_PROBE_S).status == 0
        except Exception:  # no active domain, a libvirtd that refuses: not answering
            return False

    def l2_hang(self) -> str | None:
        """The stall report when L2 is in the L2 hang (:func:`is_l2_hang`), else None."""
        report = self.stall_report()
        return report if report is not None and is_l2_hang(report) else None

    def destroy_guest(self) -> None:
        """L2 destroyed wherever it is active (its definitions kept): the end of a test
        the L2 hang took (lab.nested.hangwatch)."""
        for host in LIBVIRT_PORTS:
            with contextlib.suppress(libvirt.libvirtError):
                dom = self.conn(host).lookupByName(DOMAIN_NAME)
                if dom.isActive():
                    dom.destroy()

    def restart_guest(self) -> float:
        """L2 destroyed and undefined on every host and booted again on hosta: the only
        way back from the L2 hang (the undefine also frees the pool devices an inactive
        definition would keep held).  Seconds until its shell."""
        for host in LIBVIRT_PORTS:
            try:
                dom = self.conn(host).lookupByName(DOMAIN_NAME)
            except libvirt.libvirtError:
                continue
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
            with contextlib.suppress(libvirt.libvirtError):
                dom.undefine()
        log.warning("L2 destroyed after the L2 hang; booting it again")
        extra = self.state.l2_cmdline.removeprefix(BOOT_CMDLINE).strip()
        return self.boot_guest(extra, pv_eoi=self.state.l2_pv_eoi)

    def down(self) -> list[str]:
        for name in list(self._conns):
            self._close(name)
        done = L1.stop()
        VfioLabState.path().unlink(missing_ok=True)
        return [done] if done else []

    # -- access ------------------------------------------------------------------------

    def conn(self, host: str) -> libvirt.virConnect:
        """L0's connection to *host*'s libvirtd in L1, with ptmig's keepalive: a daemon
        that died or stopped answering fails a call in about 15 s instead of blocking it
        for good (a CI run's failure report waited on one until pytest's timeout)."""
        c = self._conns.get(host)
        if c is None or not c.isAlive():
            ensure_event_loop()  # keepalives need libvirt's event loop, before the open
            c = libvirt.open(uri(host))
            c.setKeepAlive(5, 3)
            self._conns[host] = c
        return c

    def _close(self, host: str) -> None:
        c = self._conns.pop(host, None)
        if c is not None:
            with contextlib.suppress(libvirt.libvirtError):
                c.close()

    def where(self) -> str:
        found = [
            h
            for h in LIBVIRT_PORTS
            if any(d.name() == DOMAIN_NAME and d.isActive() for d in self.conn(h).listAllDomains())
        ]
        if len(found) != 1:
            raise VfioLabError(f"the guest is active on {found or 'no host'}")
        return found[0]

    def domain(self, host: str) -> libvirt.virDomain:
        return self.conn(host).lookupByName(DOMAIN_NAME)

    def detach(self, host: str, alias: str, timeout: float = 60, config: bool = False) -> None:
        """Detach a device of the guest by alias, as virsh would, and wait until the guest
        released it (gone from the live XML); *config*: from the definition too."""
        flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if config:
            flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
        self.domain(host).detachDeviceAlias(alias, flags)
        deadline = time.monotonic() + timeout
        while f"'{alias}'" in self.domain(host).XMLDesc(0):
            if time.monotonic() > deadline:
                raise VfioLabError(f"{alias} was not released by the guest in {timeout:.0f} s")
            time.sleep(0.5)

    def l1_exec(self, command: str, timeout: float = 120) -> ExecResult:
        """Run *command* in L1 (in the checkout, with L1's python3 on it), ended by L1's
        own ``timeout`` (TERM, then KILL) a few seconds before the console gives up: a
        command the console's Ctrl-C cannot stop (a python3 blocked in a libvirt call
        ignores SIGINT until the call returns) must not keep L1's one shell from every
        command after it."""
        # protos/ holds the shared ptmig package (ptmig.serial_session) that lab.guest imports
        script = (
            "cd /mnt/src && export PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=/mnt/src:/mnt/src/protos; "
            + command
        )
        return self.l1_console.run(bounded(script, timeout), timeout=timeout)

    def accel(self) -> str:
        """How L1 runs L2: "kvm" when L1 has /dev/kvm (see docs/lab.md), else "qemu" (TCG).

        L0's TCG emulates AMD SVM with nested paging for ``-cpu max``, so L1's KVM runs L2
        at one level of emulation instead of TCG inside TCG.  PTMIG_VLAB_L2_ACCEL overrides.
        """
        forced = os.environ.get("PTMIG_VLAB_L2_ACCEL")
        if forced in ("kvm", "qemu"):
            return forced
        return "kvm" if self.l1_exec("test -c /dev/kvm").status == 0 else "qemu"

    def l1_clock_offset(self, samples: int = 5) -> tuple[float, float]:
        """L1's clock minus L0's, and the error bound (half the best console round trip)."""
        best: tuple[float, float] | None = None
        for _ in range(samples):
            t0 = time.time()
            l1 = float(self.l1_console.run("date +%s.%N").check().strip())
            t1 = time.time()
            if best is None or (t1 - t0) / 2 < best[1]:
                best = (l1 - (t0 + t1) / 2, (t1 - t0) / 2)
        assert best is not None
        return best

    def inside(self, *args: str, timeout: float = 120) -> ExecResult:
        return self.l1_exec("python3 -m lab.nested.inside " + shlex.join(args), timeout=timeout)

    def exec(self, command: str, timeout: float = 60, host: str | None = None) -> ExecResult:
        """Run *command* in L2 over its console on *host* (default: where it runs)."""
        encoded = base64.b64encode(command.encode()).decode()
        return self.inside(
            "exec", host or self.where(), str(timeout), encoded, timeout=timeout + 60
        )

    def qemu_logs(self, lines: int = 30) -> str:
        """The tail of L2's QEMU log on each host, for a failed migration's report (QEMU's
        own reason, which libvirt shortens, is only there)."""
        out = []
        for host in LIBVIRT_PORTS:
            got = self.inside("qemu-log", host, str(lines), timeout=60)
            out.append(f"--- {host}: L2's QEMU log\n{got.output.strip()}")
        return "\n".join(out)

    def bad_kernel_lines(self) -> int:
        out = self.exec(f"dmesg | grep -cE '{BAD_KERNEL_LINES}' || true").check()
        return int(out.strip().splitlines()[-1])

    def check_health(self) -> None:
        """The emulated lab's health rule for L2: console answers, no taint, no new bad line."""
        out = self.exec("cat /proc/sys/kernel/tainted").check().strip()
        bad = self.bad_kernel_lines()
        if out != "0" or bad > self.state.timings.get("dmesg_baseline", 0):
            detail = self.exec(f"dmesg | grep -E '{BAD_KERNEL_LINES}' | tail -n 20").output
            raise VfioLabError(f"L2 damaged (taint={out}, bad lines {bad}):\n{detail}")

    def spin_sample(self) -> SpinSample | None:
        """L2's vCPU as L1's libvirt sees it (no console: a test may be using it); None
        while L2 is not active on exactly one host or its registers cannot be read."""
        try:
            dom = self.domain(self.where())
            cpu_s = dom.getCPUStats(True)[0]["cpu_time"] / 1e9
            at = time.monotonic()
        except (VfioLabError, libvirt.libvirtError):
            return None
        info = self._monitor(dom, "info registers")
        regs, flags = registers(info), _STALL_FLAGS.search(info)
        if "RIP" not in regs or flags is None:
            return None
        return SpinSample(at, cpu_s, regs["RIP"], int(flags[1], 16), int(flags[2]), info)

    def spin_report(self, samples: list[SpinSample]) -> str:
        """:class:`HangWatch`'s report: the samples, then what L1's QEMU shows of L2 (as
        :meth:`stall_report`, without the console's parts), in the form
        :func:`is_l2_hang` reads."""
        last = samples[-SPIN_SAMPLES:]
        span = last[-1].at - last[0].at
        busy = (last[-1].cpu_s - last[0].cpu_s) / span if span > 0 else 0.0
        host = self.where()
        lines = [
            f"{SPIN_HEADER}: {len(last)} samples over {span:.1f} s, RIPs "
            + ", ".join(f"{s.rip:016x}" for s in last),
            f"L2 vCPU time over 1 s on {host}: {busy:.2f} s",
        ]
        dom = self.domain(host)
        for command in STALL_MONITOR_COMMANDS:
            lines.append(f"--- (qemu) {command}\n{self._monitor(dom, command)}")
        regs = registers(last[-1].registers)
        if "RSP" in regs:
            stack = self._monitor(dom, f"x /{STALL_STACK_WORDS}gx 0x{regs['RSP']:x}")
            lines.append(f"--- (qemu) x /{STALL_STACK_WORDS}gx RSP\n{stack}")
            frames = [str(f) for f in interrupt_frames(stack)] or ["none found"]
            lines.append("--- interrupt frames on L2's stack\n" + "\n".join(frames))
        return "\n".join(lines)

    def stall_report(self) -> str | None:
        """None while L2 answers on its console; else what L1 sees of it: its vCPU time
        over a second (spinning or halted), the monitor's view (STALL_MONITOR_COMMANDS)
        and L1's /proc/interrupts.  For a failed test's report: the L2 hang seen once
        had no such evidence beyond what was typed by hand."""
        host = ""  # where() itself may fail: L2 on no host, or a libvirtd that refuses
        try:
            host = self.where()
            if self.exec("true", timeout=STALL_PROBE_S).status == 0:
                return None
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        else:
            problem = "L2's console command failed"
        lines = [f"L2 does not answer ({problem[:300]})"]
        try:
            if not host:
                raise VfioLabError("L2's domain is not active on exactly one host")
            dom = self.domain(host)
            cpu = []
            for _ in range(2):
                cpu.append(dom.getCPUStats(True)[0]["cpu_time"] / 1e9)
                time.sleep(1.0)  # a second of vCPU time: the measurement, not a wait
            lines.append(f"L2 vCPU time over 1 s on {host}: {cpu[1] - cpu[0]:.2f} s")
            said = {}
            for command in STALL_MONITOR_COMMANDS:
                said[command] = self._monitor(dom, command)
                lines.append(f"--- (qemu) {command}\n{said[command]}")
            regs = registers(said["info registers"])
            if "RSP" in regs:  # the spinning handler's frame and what it interrupted
                stack = self._monitor(dom, f"x /{STALL_STACK_WORDS}gx 0x{regs['RSP']:x}")
                lines.append(f"--- (qemu) x /{STALL_STACK_WORDS}gx RSP\n{stack}")
                text = [f"{regs['RIP']:016x}"] if "RIP" in regs else []
                text += kernel_text_words(stack) + module_text_words(stack)
                if text and self.state.l2_text:
                    names = self._symbolize(text)
                    lines.append(f"--- RIP and stack words by L1's kallsyms\n{names.output}")
                    link = irq_stack_link(stack, symbol_names(names.output))
                    if link is not None:
                        stack += "\n" + self._linked_stack(dom, link, lines)
                frames = [str(f) for f in interrupt_frames(stack)] or ["none found"]
                lines.append("--- interrupt frames on L2's stack\n" + "\n".join(frames))
        except (VfioLabError, libvirt.libvirtError) as exc:
            lines.append(f"L1's libvirt: {exc}")
        interrupts = self.l1_exec("cat /proc/interrupts", timeout=30)
        lines.append(f"--- L1 /proc/interrupts\n{interrupts.output.strip()}")
        # Which exits L1's KVM takes for L2, a second apart: MSR exits at one RIP (the
        # EOI's WRMSR not skipped) or interrupt/NPF exits before it runs (docs/lab.md).
        counters = self.l1_exec(
            "mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug; "
            f"for i in 1 2; do grep -H . {KVM_EXIT_COUNTERS}; sleep 1; done",
            timeout=30,
        )
        lines.append(f"--- L1 KVM exit counters, twice 1 s apart\n{counters.output.strip()}")
        lines.append(f"--- their growth in that second: {exit_counter_deltas(counters.output)}")
        trace = self.inside("kvm-trace", str(STALL_TRACE_S), timeout=60)
        lines.append(f"--- L1 KVM trace over {STALL_TRACE_S:g} s\n{trace.output.strip()}")
        return "\n".join(lines)

    def _linked_stack(self, dom: libvirt.virDomain, link: int, lines: list[str]) -> str:
        """The interrupted stack the IRQ stack's top points at (*link*), its words named;
        appended to *lines*, and returned for the frame search."""
        stack = self._monitor(dom, f"x /{STALL_LINK_WORDS}gx 0x{link:x}")
        lines.append(f"--- (qemu) x /{STALL_LINK_WORDS}gx at the IRQ stack's link\n{stack}")
        text = kernel_text_words(stack) + module_text_words(stack)
        if text:
            names = self._symbolize(text)
            lines.append(f"--- its words by L1's kallsyms\n{names.output}")
        return stack

    def _symbolize(self, addresses: list[str]) -> ExecResult:
        """L2's *addresses* named in L1 (lab.nested.inside.symbolize)."""
        modules = json.dumps(self.state.l2_modules)
        return self.inside(
            "symbolize", self.state.l2_text, *addresses, "--modules", modules, timeout=120
        )

    @staticmethod
    def _monitor(dom: libvirt.virDomain, command: str) -> str:
        try:
            out: str = libvirt_qemu.qemuMonitorCommand(
                dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
            )
        except libvirt.libvirtError as exc:
            return f"(failed: {exc})"
        return out.strip()

    def libvirtd_report(self, timeout: float = LIBVIRTD_PROBE_S) -> str | None:
        """None while every host's libvirtd answers in L1; else, for each that does not,
        all of its threads' stacks and its log's tail (lab.nested.inside.libvirtd_report).
        For a failed test's report: hostb's deadlock seen once had no backtrace."""
        reports = []
        for host, dev in self.state.hosts.items():
            out = self.inside(
                "libvirtd-report", host, str(dev.pid), str(timeout), timeout=timeout + 120
            )
            text = out.output.strip()
            if out.status != 0 or text.splitlines()[-1:] != ["answers"]:
                reports.append(text)
        return "\n".join(reports) or None

    def agent_report(self) -> str:
        """L2's agent as L2 sees it: its processes, its log's tail, the channel's port and
        the links.  For a failure where L2 answers but ptmig's calls into its agent do not
        (a CI run's fixture saw only DEADLINE_EXCEEDED for 300 s, and nothing else)."""
        out = self.exec(AGENT_REPORT, timeout=STALL_PROBE_S)
        return out.output.strip() if out.status == 0 else f"(exit {out.status}) {out.output}"

    def hang_evidence(self) -> list[tuple[str, str]]:
        """(title, text) of what a failed or timed-out nested run should carry: every
        libvirtd that does not answer in L1, with its threads' stacks; else, if L2 does
        not answer, the stall report (its libvirt calls would block on a stuck daemon);
        else what L2's agent shows.  A wedged L1 console comes first: every other
        report runs on it."""
        wedged = self.l1_console_report()
        if wedged is not None:
            return [("L1 console report", wedged)]
        restarted = self.l1_restart_report()
        if restarted is not None:
            return [("L1 restart report", restarted)]
        stuck = self.libvirtd_report()
        if stuck is not None:
            return [("L1 libvirtd report", stuck)]
        stall = self.stall_report()
        if stall is not None:
            return [("L2 stall report", stall)]
        return [("L2 agent report", self.agent_report())]

    def evidence_or_why(self) -> list[tuple[str, str]]:
        """:meth:`hang_evidence`, or why it could not be had: a report must not hide the
        failure it reports."""
        try:
            return self.hang_evidence()
        except Exception as exc:
            return [("nested lab report", f"failed: {type(exc).__name__}: {exc}")]

    def print_evidence(self) -> None:
        """For a module fixture's failure (pytest attaches no report section to a setup
        that failed): printed, so the first test's error carries it as captured output."""
        for title, text in self.evidence_or_why():
            print(f"=== {title}\n{text}", flush=True)

    def status(self) -> dict[str, Any]:
        pid = running_pid()
        info: dict[str, Any] = {"up": pid is not None, "l1_pid": pid}
        if pid is not None:
            info["uris"] = {h: uri(h) for h in LIBVIRT_PORTS}
            info["hosts"] = {h: asdict(d) for h, d in self.state.hosts.items()}
            info["timings"] = self.state.timings
            info["l1_kernel"] = self.state.l1_kernel
            info["mtty"] = self.state.mtty
            try:
                info["guest_on"] = self.where()
            except (VfioLabError, libvirt.libvirtError) as exc:
                info["guest_on"] = None
                info["problem"] = str(exc)
        return info


@dataclass
class L1Pinger:
    """``lab.traffic send`` in L1's client namespace, at *rate* to *target*.

    The record stays in L1 and is analysed there; phases (L0 epoch times, from ptmig's
    report) are moved onto L1's clock by the offset measured over the console, whose
    round trip bounds its error (reported as ``clock_error_s``).
    """

    lab: VfioLab
    target: str
    name: str
    rate: float

    @property
    def outfile(self) -> str:
        return f"/tmp/ping-{self.name}.tsv"

    def start(self) -> None:
        self.lab.l1_exec(
            f"rm -f {self.outfile}; (ip netns exec ptmig-client python3 -m lab.traffic send "
            f"{self.target} {self.outfile} --rate {self.rate} >/tmp/ping-{self.name}.err 2>&1 "
            f"& echo $! > /tmp/ping-{self.name}.pid)"
        ).check()

    def stop_and_analyze(self, phases: list[Phase]) -> dict[str, Any]:
        self.lab.l1_exec(f"kill -INT $(cat /tmp/ping-{self.name}.pid); sleep 1.5").check()
        offset, error = self.lab.l1_clock_offset()
        lines = "".join(f"{p.name} {p.start + offset:.6f} {p.end + offset:.6f}\\n" for p in phases)
        out = self.lab.l1_exec(
            f"printf '{lines}' > /tmp/ping-{self.name}.phases; python3 -m lab.traffic analyze "
            f"{self.outfile} --phases /tmp/ping-{self.name}.phases --json",
            timeout=300,
        ).check()
        report: dict[str, Any] = json.loads(out[out.index("{") :])
        report["clock_error_s"] = round(error, 3)
        report["clock_offset_s"] = round(offset, 6)  # L1's clock minus L0's
        return report
