"""The part of the nested lab that runs inside L1 (``python3 -m lab.nested.inside``).

L1 mounts this checkout read-only over 9p and runs it with its own python3, so the emulated
lab's fabric and hosts (:mod:`lab.fabric`, :mod:`lab.hosts`) build the two hosts here as they
do on L0.  On top of them it moves the wire NICs into place: L1's uplink into the switch, each
host's igb PF (with its VFs created) and whole e1000e into that host's namespace, and each
host's guest bridge gets its address on the user-network segment, where L0's port forwards
to its libvirtd arrive.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import contextlib
import functools
import json
import logging
import lzma
import mmap
import re
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lab import fabric
from lab.console import GuestConsole
from lab.guest import CONSOLE_LOG, CONSOLE_SOCKET, DOMAIN_NAME
from lab.hosts import PRIVATE_DIRS, LabHost
from lab.run import run

log = logging.getLogger(__name__)

NUM_VFS = 2


def netdev_by_mac(mac: str) -> str:
    for dev in Path("/sys/class/net").iterdir():
        addr = dev / "address"
        if addr.exists() and addr.read_text().strip() == mac:
            return dev.name
    raise RuntimeError(f"no netdev with MAC {mac} in L1")


def pci_of(netdev: str) -> str:
    return Path(f"/sys/class/net/{netdev}/device").resolve().name


#: A VF's STATUS register, in its BAR0 (82576 datasheet, VF register map).
VF_STATUS = 0x0008


def vf_bar_decodes(vf_pci: str) -> bool:
    """Whether the VF answers at the BAR0 address the kernel assigned it.

    An 82576 VF reads STATUS non-zero (link up, speed, full duplex come from the PF).
    QEMU 10.0's igb realizes its VFs before it declares their BARs 64-bit, so each VF's
    BAR is registered as a 32-bit one and is not decoded at the 64-bit address the kernel
    programs: reads return 0 and writes are dropped (docs/lab.md, "igbvf in L2").  An
    emulated VF decodes only once its own COMMAND memory bit is set (real hardware decodes
    on the PF's SR-IOV memory enable), so the probe enables the device for the read and
    disables it after; otherwise every VF reads 0, on any QEMU.  Read with no driver bound:
    sysfs refuses to map a BAR a driver holds.
    """
    dev = Path(f"/sys/bus/pci/devices/{vf_pci}")
    if (dev / "driver").exists():
        raise RuntimeError(
            f"VF {vf_pci} is bound to {(dev / 'driver').resolve().name}: its BAR cannot be "
            "probed (unbind it, or keep drivers_autoprobe off for the lab's VFs)"
        )
    (dev / "enable").write_text("1\n")
    try:
        with (
            open(dev / "resource0", "r+b") as f,
            mmap.mmap(f.fileno(), mmap.PAGESIZE) as bar,
        ):
            status: int = struct.unpack_from("<I", bar, VF_STATUS)[0]
    finally:
        (dev / "enable").write_text("0\n")
    return status != 0


def up(
    wires: dict[str, dict[str, str]], uplink_mac: str, uplink_ips: dict[str, str]
) -> dict[str, dict[str, object]]:
    """*wires*: host -> {"igb": MAC, "e1000e": MAC}."""
    for mnt in [*PRIVATE_DIRS, "/var/cache/libvirt"]:  # L1's root is ours: no cleanup
        Path(mnt).mkdir(parents=True, exist_ok=True)
    fabric.create()
    uplink = netdev_by_mac(uplink_mac)
    run(["ip", "link", "set", uplink, "netns", fabric.SWITCH_NS])
    run(["ip", "-n", fabric.SWITCH_NS, "link", "set", uplink, "master", "br-sw", "up"])
    info: dict[str, dict[str, object]] = {}
    for net in fabric.HOSTS:
        pf = netdev_by_mac(wires[net.name]["igb"])
        pf_pci = pci_of(pf)
        Path(f"/sys/class/net/{pf}/device/sriov_numvfs").write_text(f"{NUM_VFS}\n")
        pf_dir = Path(f"/sys/bus/pci/devices/{pf_pci}")
        vfs = sorted(p.resolve().name for p in pf_dir.glob("virtfn*"))
        whole = netdev_by_mac(wires[net.name]["e1000e"])
        whole_pci = pci_of(whole)
        for dev in (pf, whole):
            run(["ip", "link", "set", dev, "netns", net.netns])
        run(["ip", "-n", net.netns, "link", "set", pf, "up"])
        run(
            [
                "ip",
                "-n",
                net.netns,
                "addr",
                "add",
                f"{uplink_ips[net.name]}/24",
                "dev",
                fabric.GUEST_BRIDGE,
            ]
        )
        host = LabHost(net, listen_addr="0.0.0.0")
        pid = host.start()
        info[net.name] = {
            "pid": pid,
            "pf": pf,
            "pf_pci": pf_pci,
            "vfs": vfs,
            "whole": whole,
            "whole_pci": whole_pci,
            "vf_bar_decodes": all(vf_bar_decodes(vf) for vf in vfs),
        }
    return info


def guest_console(host: str) -> GuestConsole:
    """L2's console on *host* (lab.guest's paths, as the host's daemon sees them)."""
    lab_host = LabHost(next(n for n in fabric.HOSTS if n.name == host))
    return GuestConsole(lab_host.path_inside(CONSOLE_SOCKET), lab_host.path_inside(CONSOLE_LOG))


def qemu_log(host: str, lines: int) -> str:
    """The last *lines* of L2's QEMU log on *host* (libvirt's per-domain log: QEMU's own
    error reports, e.g. why a migration's setup failed, land only there)."""
    lab_host = LabHost(next(n for n in fabric.HOSTS if n.name == host))
    path = lab_host.path_inside(f"/var/log/libvirt/qemu/{DOMAIN_NAME}.log")
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])


def guest_clock_offset(host: str, samples: int = 5) -> tuple[float, float]:
    """L2's clock minus L1's over L2's console, and the error bound (half the best round
    trip)."""
    console = guest_console(host)
    best: tuple[float, float] | None = None
    for _ in range(samples):
        t0 = time.time()
        l2 = float(console.run("date +%s.%N").check().strip())
        t1 = time.time()
        if best is None or (t1 - t0) / 2 < best[1]:
            best = (l2 - (t0 + t1) / 2, (t1 - t0) / 2)
    assert best is not None
    return best


#: L1's KVM tracepoints that tell which of docs/lab.md's "L2 hung after a VF hot-plug"
#: hypotheses holds: exits and their RIPs, MSR accesses (the x2APIC EOI is MSR 0x80b),
#: interrupts injected and the IOAPIC's view of its lines.
KVM_TRACE_EVENTS = (
    "kvm:kvm_exit",
    "kvm:kvm_msr",
    "kvm:kvm_inj_virq",
    "kvm:kvm_ioapic_set_irq",
    "kvm:kvm_ioapic_delayed_eoi_inj",
    "kvm:kvm_eoi",
)
#: ``<task>-<pid> [cpu] flags timestamp: kvm_exit: vcpu 0 reason msr rip 0x...``; the task
#: name has spaces (``CPU 0/KVM``), so only the event and its text are matched.
_TRACE_EVENT = re.compile(r"\s(kvm_\w+): (.*)$")
_EXIT = re.compile(r"reason (\S+) rip (0x[0-9a-f]+)")


@dataclass
class KvmTraceSummary:
    """What L1's KVM did for its guests over a short trace (:func:`kvm_trace`)."""

    seconds: float
    events: Counter[str] = field(default_factory=Counter)
    #: Exit reason -> count, and (reason, RIP) -> count: one RIP for every MSR exit means
    #: the guest never got past its WRMSR; interrupt exits only, that it never ran.
    exit_reasons: Counter[str] = field(default_factory=Counter)
    exit_rips: Counter[tuple[str, str]] = field(default_factory=Counter)
    #: kvm_msr lines (``msr_write 80b = 0x0``), kvm_inj_virq lines (``IRQ 0x21``), ...
    details: Counter[str] = field(default_factory=Counter)

    def text(self, top: int = 8) -> str:
        rate = {k: round(v / self.seconds) for k, v in self.events.most_common()}
        lines = [f"events per second over {self.seconds:g} s: {rate}"]
        lines.append(f"exit reasons: {dict(self.exit_reasons.most_common(top))}")
        lines.append(
            "exits by RIP: "
            + ", ".join(f"{r}@{rip} x{n}" for (r, rip), n in self.exit_rips.most_common(top))
        )
        lines.append(
            "other events: " + ", ".join(f"{d} x{n}" for d, n in self.details.most_common(top))
        )
        return "\n".join(lines)


def summarize_kvm_trace(trace: str, seconds: float) -> KvmTraceSummary:
    """Count a ftrace ``trace`` file's KVM events (``kvm_exit: reason EXIT_MSR rip 0x...``)."""
    summary = KvmTraceSummary(seconds)
    for line in trace.splitlines():
        m = None if line.startswith("#") else _TRACE_EVENT.search(line)
        if m is None:
            continue
        event, rest = m.group(1), m.group(2).strip()
        summary.events[event] += 1
        if event == "kvm_exit":
            exit_ = _EXIT.search(rest)
            if exit_:
                summary.exit_reasons[exit_.group(1)] += 1
                summary.exit_rips[(exit_.group(1), exit_.group(2))] += 1
        else:
            summary.details[f"{event}: {rest}"] += 1
    return summary


#: What the flight recorder keeps: each entry into L2 with its RIP, each exit with its
#: reason and RIP, each injection (6.1 marks a re-injected one), each host interrupt
#: taken in L2: the last of them before a hang or L2's triple fault ("shutdown").
FLIGHT_EVENTS = ("kvm:kvm_entry", "kvm:kvm_exit", "kvm:kvm_inj_virq", "kvm:kvm_inj_exception")


def _tracefs() -> Path:
    tracing = Path("/sys/kernel/tracing")
    if not (tracing / "trace").exists():
        subprocess.run(["mount", "-t", "tracefs", "nodev", str(tracing)], check=True)
    return tracing


def flight_recorder_start() -> None:
    """Trace L1's KVM from now on into the ring buffer (the oldest events dropped), so a
    hang or an L2 reset can be read back with what led to it (``flight_recorder_tail``)."""
    _trace_afresh(FLIGHT_EVENTS, 32768)


def _trace_afresh(events: tuple[str, ...], buffer_kb: int) -> Path:
    """Tracing on for *events* alone, into an emptied buffer of *buffer_kb* per CPU."""
    tracing = _tracefs()
    (tracing / "tracing_on").write_text("0\n")
    (tracing / "set_event").write_text("\n".join(events) + "\n")
    (tracing / "buffer_size_kb").write_text(f"{buffer_kb}\n")
    (tracing / "trace").write_text("")
    (tracing / "tracing_on").write_text("1\n")
    return tracing


def flight_recorder_tail(lines: int) -> str:
    """The recorder's last *lines* events, tracing stopped (kvm_trace reuses the buffer);
    with each ``kvm_exit`` reason's count over them and L1's kernel log's tail."""
    tracing = _tracefs()
    (tracing / "tracing_on").write_text("0\n")
    events = (tracing / "trace").read_text(errors="replace").splitlines()
    tail = [e for e in events if not e.startswith("#")][-lines:]
    reasons: dict[str, int] = {}
    for e in tail:
        m = re.search(r"kvm_exit: vcpu \d+ reason (\S+)", e)
        if m:
            reasons[m.group(1)] = reasons.get(m.group(1), 0) + 1
    shutdowns = [e for e in events if "reason shutdown" in e]
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    out = [f"exit reasons in the last {len(tail)} events: {reasons}"]
    out.append(f"shutdown exits (L2 triple faults) in the whole buffer: {len(shutdowns)}")
    out.extend(shutdowns[-5:])
    out.append("--- L1 dmesg, last 30 lines")
    out.extend(dmesg[-30:])
    out.append(f"--- the last {len(tail)} events")
    out.extend(tail)
    before, start = spin_onset(events)
    out.append(f"--- the {len(before)} events before L2 began to exit at one RIP only, then 40")
    out.extend(before + events[start : start + 40])
    return "\n".join(out)


_RIP = re.compile(r"\brip 0x([0-9a-f]+)")


def spin_onset(events: list[str], before: int = 300) -> tuple[list[str], int]:
    """Where the trailing run of entries and exits at the last event's RIP begins (a vCPU
    spinning at one instruction), and the *before* events that led to it: the injection
    that broke L2 is there, the tail holds only the spin."""
    rips = [_RIP.search(e) for e in events]
    last = next((m.group(1) for m in reversed(rips) if m), None)
    start = 0
    for i in range(len(events) - 1, -1, -1):
        m = rips[i]
        if m and m.group(1) != last:
            start = i + 1
            break
    return events[max(0, start - before) : start], start


def kvm_trace(seconds: float) -> KvmTraceSummary:
    """Trace L1's KVM for *seconds* (tracefs; debugfs is mounted by the stall report)."""
    tracing = _trace_afresh(KVM_TRACE_EVENTS, 8192)
    time.sleep(seconds)  # the trace's window: the measurement
    (tracing / "tracing_on").write_text("0\n")
    (tracing / "set_event").write_text("")
    return summarize_kvm_trace((tracing / "trace").read_text(errors="replace"), seconds)


def libvirtd_report(host: str, pid: int, timeout: float) -> str | None:
    """None when *host*'s libvirtd answers a ``virsh list`` within *timeout*; else every
    one of its threads' stacks (``eu-stack``, from L1's image) and its log's tail: the
    evidence for a daemon that deadlocked (docs/lab.md, "hostb's libvirtd")."""
    lab_host = LabHost(next(n for n in fabric.HOSTS if n.name == host))
    try:
        probe = subprocess.run(
            ["virsh", "-c", lab_host.uri, "list", "--all"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if probe.returncode == 0:
            return None
        problem = f"virsh list failed: {probe.stderr.strip()[-300:]}"
    except subprocess.TimeoutExpired:
        problem = f"virsh list did not answer in {timeout:g} s"
    lines = [f"{host}'s libvirtd (pid {pid}): {problem}"]
    if Path(f"/proc/{pid}").exists():
        lines.extend(_thread_stacks(pid))
    else:  # gone, not stuck: how it ended, if anything said so
        lines.append(f"--- pid {pid} is gone; the tail of its stdout and stderr")
        with contextlib.suppress(OSError):
            stdout = (lab_host.state_dir / "libvirtd.stdout").read_text(errors="replace")
            lines.extend(stdout.splitlines()[-20:])
        kernel = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
        lines.append("--- L1's kernel log, its last lines")
        lines.extend(kernel.stdout.splitlines()[-40:])
    log_lines = lab_host.log_file.read_text(errors="replace").splitlines()[-20:]
    lines.append(f"--- last lines of {lab_host.log_file}")
    lines.extend(log_lines)
    return "\n".join(lines)


def _thread_stacks(pid: int) -> list[str]:
    """Every thread's stack of a live *pid* (``eu-stack``), else each one's kernel wait."""
    lines = []
    stack = subprocess.run(
        ["eu-stack", "-p", str(pid), "-m"], capture_output=True, text=True, timeout=60
    )
    lines.append(f"--- eu-stack -p {pid} -m (exit {stack.returncode})")
    lines.append((stack.stdout + stack.stderr).strip())
    if stack.returncode != 0:  # no eu-stack (an image before it): each thread's kernel side
        for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
            wchan = (task / "wchan").read_text().strip()
            lines.append(f"task {task.name} {(task / 'comm').read_text().strip()} {wchan}")
    return lines


def elf_section_symbols(data: bytes, section: str) -> list[tuple[int, str]]:
    """The function and untyped symbols of an ELF64 relocatable object (a kernel module's
    ``.ko``) defined in *section*, as (offset in the section, name), sorted: what names
    an address in a module once the module's section base is known."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a little-endian ELF64 object")
    shoff, shentsize, shnum, shstrndx = (
        struct.unpack_from("<Q", data, 0x28)[0],
        *struct.unpack_from("<HHH", data, 0x3A),
    )
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]

    def name_at(table: int, offset: int) -> str:
        start = headers[table][4] + offset
        return data[start : data.index(b"\0", start)].decode(errors="replace")

    wanted = [i for i, h in enumerate(headers) if name_at(shstrndx, h[0]) == section]
    symtab = next((h for h in headers if h[1] == 2), None)  # SHT_SYMTAB
    if not wanted or symtab is None:
        return []
    symbols = []
    for off in range(symtab[4], symtab[4] + symtab[5], 24):
        st_name, st_info, _other, st_shndx, st_value, _size = struct.unpack_from(
            "<IBBHQQ", data, off
        )
        if st_shndx == wanted[0] and st_info & 0xF in (0, 2) and st_name:  # NOTYPE, FUNC
            symbols.append((st_value, name_at(symtab[6], st_name)))
    return sorted(symbols)


def module_file(name: str, release: str) -> Path | None:
    """The ``.ko`` (or ``.ko.xz``) of module *name* under /lib/modules/*release*."""
    root = Path("/lib/modules") / release
    for stem in {name, name.replace("_", "-")}:
        for found in sorted(root.rglob(f"{stem}.ko*")):
            return found
    return None


@functools.cache
def module_symbols(name: str, section: str, release: str) -> list[tuple[int, str]]:
    """:func:`elf_section_symbols` of L1's copy of module *name* ([] if it has none); read
    once per process, however many of a report's addresses fall in it."""
    path = module_file(name, release)
    if path is None:
        return []
    data = path.read_bytes()
    if path.suffix == ".xz":
        data = lzma.decompress(data)
    return elf_section_symbols(data, section)


def symbolize(
    kallsyms: str,
    l2_text: int,
    addresses: list[int],
    modules: dict[str, int] | None = None,
    symbols_of: Callable[[str, str], list[tuple[int, str]]] | None = None,
) -> list[str]:
    """Name L2's kernel addresses by L1's symbols (*kallsyms*, L1's /proc/kallsyms):
    both run Debian's same kernel with their own KASLR base, so an L2 address minus L2's
    ``_text`` plus L1's falls on the same instruction.  An address in one of L2's modules
    (*modules*: ``"module/section"`` -> its base in L2, lab.nested.vlab.module_sections)
    is named by the module's own symbols (*symbols_of(module, section)*: offsets in the
    section, from the same module's ``.ko`` in L1).  ``?`` where nothing matches."""
    text: list[tuple[int, str]] = []
    for line in kallsyms.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] in "tT":
            text.append((int(parts[0], 16), parts[2]))
    text.sort()
    starts = [a for a, _ in text]
    l1_text = next((a for a, n in text if n == "_text"), None)
    bases = sorted((base, key) for key, base in (modules or {}).items())
    base_starts = [b for b, _ in bases]
    named = []
    for addr in addresses:
        name = "?"
        if l1_text is not None:
            here = addr - l2_text + l1_text
            i = bisect.bisect_right(starts, here) - 1
            if i >= 0 and here - starts[i] < 0x10000:
                name = f"{text[i][1]}+0x{here - starts[i]:x}"
        j = bisect.bisect_right(base_starts, addr) - 1
        if name == "?" and j >= 0 and addr - bases[j][0] < 0x100000:
            base, key = bases[j]
            module, section = key.split("/", 1)
            name = f"[{module} {section}+0x{addr - base:x}]"
            syms = symbols_of(module, section) if symbols_of else []
            k = bisect.bisect_right(syms, addr - base, key=lambda sym: sym[0]) - 1
            if k >= 0:
                name = f"{syms[k][1]}+0x{addr - base - syms[k][0]:x} {name}"
        named.append(f"{addr:016x} {name}")
    return named


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    p = argparse.ArgumentParser(prog="lab.nested.inside")
    sub = p.add_subparsers(dest="command", required=True)
    u = sub.add_parser("up")
    u.add_argument("spec", help="JSON: {wires, uplink_mac, uplink_ips}")
    w = sub.add_parser("wait-shell", help="wait for L2's console shell on HOST")
    w.add_argument("host")
    w.add_argument("since", type=int)
    w.add_argument("timeout", type=float)
    sz = sub.add_parser("console-size")
    sz.add_argument("host")
    c = sub.add_parser("clock", help="L2's clock on HOST minus L1's, and its error bound")
    c.add_argument("host")
    q = sub.add_parser("qemu-log", help="the tail of L2's QEMU log on HOST")
    q.add_argument("host")
    q.add_argument("lines", type=int)
    e = sub.add_parser("exec", help="run a base64-encoded command in L2 on HOST")
    e.add_argument("host")
    e.add_argument("timeout", type=float)
    e.add_argument("command_b64")
    fr = sub.add_parser("flight-recorder", help="L1's KVM events into the ring buffer")
    fr.add_argument("action", choices=("start", "tail"))
    fr.add_argument("lines", type=int, nargs="?", default=400)
    t = sub.add_parser("kvm-trace", help="L1's KVM events over SECONDS, summarized")
    t.add_argument("seconds", type=float)
    lr = sub.add_parser("libvirtd-report", help="HOST's libvirtd: nothing if it answers")
    lr.add_argument("host")
    lr.add_argument("pid", type=int)
    lr.add_argument("timeout", type=float)
    sy = sub.add_parser("symbolize", help="L2 kernel addresses by L1's kallsyms")
    sy.add_argument("l2_text", help="L2's _text, hex")
    sy.add_argument("addresses", nargs="+", help="hex")
    sy.add_argument("--modules", default="{}", help='JSON: {"module/section": "hex base"}')
    args = p.parse_args(argv)
    if args.command == "symbolize":
        release = Path("/proc/sys/kernel/osrelease").read_text().strip()
        print(f"(L1's kernel {release}; L2's must be the same for these names)")
        names = symbolize(
            Path("/proc/kallsyms").read_text(),
            int(args.l2_text, 16),
            [int(a, 16) for a in args.addresses],
            {k: int(v, 16) for k, v in json.loads(args.modules).items()},
            lambda module, section: module_symbols(module, section, release),
        )
        print("\n".join(names))
    elif args.command == "flight-recorder":
        if args.action == "start":
            flight_recorder_start()
        else:
            print(flight_recorder_tail(args.lines))
    elif args.command == "kvm-trace":
        print(kvm_trace(args.seconds).text())
    elif args.command == "libvirtd-report":
        print(libvirtd_report(args.host, args.pid, args.timeout) or "answers")
    elif args.command == "up":
        spec = json.loads(args.spec)
        print(json.dumps(up(spec["wires"], spec["uplink_mac"], spec["uplink_ips"])))
    elif args.command == "wait-shell":
        print(guest_console(args.host).wait_for_shell(args.since, args.timeout))
    elif args.command == "clock":
        print("{:.6f} {:.6f}".format(*guest_clock_offset(args.host)))
    elif args.command == "qemu-log":
        print(qemu_log(args.host, args.lines))
    elif args.command == "console-size":
        print(guest_console(args.host).log_size())
    elif args.command == "exec":
        result = guest_console(args.host).run(
            base64.b64decode(args.command_b64).decode(), timeout=args.timeout
        )
        sys.stdout.write(result.output)
        return result.status
    return 0


if __name__ == "__main__":
    sys.exit(main())
