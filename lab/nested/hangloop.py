"""Reproduce the nested L2 hang after a VF hot-plug on purpose, and measure its mitigations.

docs/lab.md ("L2 hung after a VF hot-plug"): roughly one nested test run in three to five
ends with L2 no longer answering after a VF was plugged into it.  This drives only that:
one L1 and L2 boot, team wan's whole e1000e plugged once (as in every VF test), ping at
L2 from L1's client namespace, then the VF plug and unplug the Nova-style test does
(:mod:`lab.nested.orchestrated`: ``<interface type='hostdev' managed='yes'>``, persistent
and live) into L2, over and over, until L2 stops answering, a libvirt call into L1 does
not return, or the iterations or the time budget run out.  At a hang it takes the stall
report (``VfioLab.stall_report``) or every libvirtd thread's stack
(``VfioLab.libvirtd_report``), then takes the lab down.

A *variant* names kernel command line extras for L1 and L2, so a mitigation is measured
against the control with no image rebuild::

    flock /tmp/ptmig-lab.lock timeout 1200 python -m lab.nested.hangloop \\
        --variant control --iterations 300 --budget-s 960 --out /var/tmp/hang-control.json

Under the lab lock (it boots L1); the JSON holds every iteration and the evidence.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import libvirt

from host.domain.devices import pci_hostdev_xml
from lab import GUEST_IP
from lab.nested import orchestrated as orch
from lab.nested.kicker import Kicker
from lab.nested.l1 import L1
from lab.nested.vlab import (
    STALL_PROBE_S,
    L1Pinger,
    LibvirtTimeout,
    VfioLab,
    VfioLabError,
    is_l2_hang,
    within,
)
from lab.orchestrated import attach_at, free_bus

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds one libvirt call into L1 may take before the daemon counts as hung (an attach
#: took 2.5 s, a detach 0.5 s: docs/lab.md).
LIBVIRT_CALL_S = 120.0
#: Seconds L2 may take from the attach returning to igbvf driving the VF (igbvf waits up
#: to 2 s on the PF's mailbox; the Nova-style test measured 2-3 s to the bond).
VF_UP_S = 60.0
#: L1 KVM events kept at a failed iteration (entries, exits, injections): L2's last
#: seconds before a hang or a triple fault (an L2 reset: "reason shutdown").
FLIGHT_TAIL = 600
#: Seconds between two checks of L2 when the loop only watches (``--watch-only``).
WATCH_S = 5.0
#: Alias of team wan's whole NIC, plugged once before the loop.
WHOLE_ALIAS = "ua-hang-wan"


@dataclass(frozen=True)
class Variant:
    """Extras for L1's and L2's kernel command lines, and whether L2 is offered PV EOI;
    what the variant turns off."""

    name: str
    l1: str = ""
    l2: str = ""
    l2_pv_eoi: bool = True


#: The mitigations docs/lab.md names, by name; ``--variant a,b`` combines them.
VARIANTS = {
    "control": Variant("control"),
    # keeps TCG's emulated virtual GIF (svm_helper.c: V_GIF_ENABLED) out of L2's VMRUNs
    "vgif0": Variant("vgif0", l1="kvm_amd.vgif=0"),
    # L2's EOI becomes an MMIO write to the xAPIC page instead of WRMSR 0x80b
    "nox2apic": Variant("nox2apic", l2="nox2apic"),
    # shadow paging in L1 for L2: no nested page faults under TCG's NPT
    "npt0": Variant("npt0", l1="kvm_amd.npt=0"),
    # 6.1's default already, and TCG offers no AVIC: a control of the control
    "avic0": Variant("avic0", l1="kvm_amd.avic=0"),
    # L2 as a generic guest: no PV EOI, so every EOI exits again (a #VMEXIT resets L0's
    # exception_index; docs/lab.md, "The frame read"); kvm-clock and the other PV
    # features go with it (the only switch for PV EOI on L2's command line)
    "nopv": Variant("nopv", l2="nopv"),
    # only PV EOI off (<apic eoi='off'/>: L2's CPUID has no KVM_FEATURE_PV_EOI): the EOI
    # of an edge interrupt exits at once again, kvm-clock and the rest stay.  Measured under
    # kicks: a panic after 110 s instead of the deadlock in 25 s (docs/lab.md)
    "pveoi0": Variant("pveoi0", l2_pv_eoi=False),
}


def variant(spec: str) -> Variant:
    """``vgif0`` or ``vgif0,nox2apic``: the named variants' extras together."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if not names or unknown:
        raise ValueError(f"unknown variant {unknown or spec!r}; known: {', '.join(VARIANTS)}")
    parts = [VARIANTS[n] for n in names]
    return Variant(
        "+".join(names),
        " ".join(p.l1 for p in parts if p.l1),
        " ".join(p.l2 for p in parts if p.l2),
        all(p.l2_pv_eoi for p in parts),
    )


class L2Restarted(VfioLabError):
    """L2's uptime went back: it reset (a triple fault: L2 boots with panic=0)."""


@dataclass
class Iteration:
    number: int
    vf: str
    plug_s: float = 0.0
    #: From the attach's return to igbvf's netdev up in L2.
    vf_up_s: float = 0.0
    unplug_s: float = 0.0
    #: ok, l2-stalled, libvirt-timeout or error (with *detail*).
    outcome: str = "ok"
    detail: str = ""


@dataclass
class LoopResult:
    variant: Variant
    started: float
    #: L0's QEMU and its binary fixes (lab.nested.qemu.BINARY_FIXES), as the lab ran them.
    qemu: str = ""
    qemu_fixes: dict[str, str] = field(default_factory=dict)
    l1_kernel: str = ""
    l1_vcpus: int = 0
    l1_cmdline: str = ""
    kvm_amd: dict[str, str] = field(default_factory=dict)
    l2_cmdline: str = ""
    #: stop/cont pairs a second on L0's monitor (lab.nested.kicker), 0: none; and how many
    #: were sent, and why the kicker ended early if it did.
    kick_hz: float = 0.0
    kicks: int = 0
    kick_error: str = ""
    boot_s: float = 0.0
    iterations: list[Iteration] = field(default_factory=list)
    migrations: list[str] = field(default_factory=list)
    #: Why the loop ended: iterations, budget, or the failed iteration's outcome.
    ended: str = ""
    evidence: str = ""
    #: Whether the evidence's stall report is the L2 hang's (lab.nested.vlab.is_l2_hang).
    l2_hang_signature: bool = False

    @property
    def hang(self) -> Iteration | None:
        bad = [
            i
            for i in self.iterations
            if i.outcome in ("l2-stalled", "l2-restarted", "libvirt-timeout")
        ]
        return bad[0] if bad else None

    def summary(self) -> str:
        ok = sum(1 for i in self.iterations if i.outcome == "ok")
        hang = self.hang
        where = f"hang at iteration {hang.number} ({hang.outcome})" if hang else "no hang"
        if hang and self.l2_hang_signature:
            where += ", the L2 hang's signature"
        return (
            f"variant {self.variant.name} (QEMU {self.qemu} fixes {self.qemu_fixes}, "
            f"L1 {self.l1_kernel}, {self.l1_vcpus} vCPUs, "
            f"kvm_amd {self.kvm_amd}, "
            f"L2 +{self.variant.l2 or '-'} pv_eoi {self.variant.l2_pv_eoi}, "
            f"kicks {self.kicks} at {self.kick_hz:g}/s): {ok} iterations ok, "
            f"{len(self.migrations)} migrations, {where}; ended: {self.ended}"
        )

    def save(self, path: Path) -> None:
        data = asdict(self)
        data["summary"] = self.summary()
        path.write_text(json.dumps(data, indent=1))


def wait_vf_up_in_l2(lab: VfioLab, timeout: float = VF_UP_S) -> float:
    """Seconds until igbvf drives a netdev in L2 and it is up (its MSI-X in use, as when
    the agent enslaves it); raises VfioLabError if L2 answers but the VF never comes."""
    t0 = time.monotonic()
    lab.exec(  # in a subshell: an exit in the console's own shell would end it
        f"(for i in $(seq {int(timeout * 5)}); do "
        "n=$(ls /sys/bus/pci/drivers/igbvf/*/net/ 2>/dev/null | head -n 1); "
        '[ -n "$n" ] && ip link set dev "$n" up && exit 0; sleep 0.2; done; exit 1)',
        timeout=timeout + 30,
    ).check()
    return time.monotonic() - t0


def one_iteration(lab: VfioLab, host: str, number: int) -> Iteration:
    """Plug a VF of *host* (alternating the two), wait for it in L2, unplug it."""
    vfs = lab.state.hosts[host].vfs
    it = Iteration(number, vfs[number % len(vfs)])
    t0 = time.monotonic()
    alias = within(LIBVIRT_CALL_S, "attach", lambda: orch.plug_vf(lab, host, it.vf, number))
    it.plug_s = round(time.monotonic() - t0, 2)
    it.vf_up_s = round(wait_vf_up_in_l2(lab), 2)
    t1 = time.monotonic()
    within(2 * LIBVIRT_CALL_S, "detach", lambda: lab.detach(host, alias, config=True))
    it.unplug_s = round(time.monotonic() - t1, 2)
    return it


def watch_once(lab: VfioLab, number: int, since: float) -> tuple[Iteration, float]:
    """No plug: WATCH_S of L2 running (under the ping and the kicks), then its uptime
    checked; the iteration and that uptime."""
    time.sleep(WATCH_S)  # the measurement's period: L2 left alone for it
    t0 = time.monotonic()
    uptime = l2_uptime(lab, f"after watch {number}", since)
    return Iteration(number, "watch", plug_s=round(time.monotonic() - t0, 2)), uptime


def attach_whole_nic(lab: VfioLab, host: str) -> None:
    """Team wan's whole e1000e of *host*, live, as every VF test has it beside the VF."""
    whole = pci_hostdev_xml(alias=WHOLE_ALIAS, pci_address=lab.state.hosts[host].whole_pci)
    dom = lab.domain(host)
    within(
        LIBVIRT_CALL_S,
        "whole NIC attach",
        lambda: attach_at(dom, whole, free_bus(dom), libvirt.VIR_DOMAIN_AFFECT_LIVE),
    )


def migrate_with_whole_nic(lab: VfioLab) -> str:
    """L2 to the other host as the tests move it (libvirt migrates no domain with a vfio
    device): the whole NIC unplugged, plain live migration, the destination's plugged.
    Both hangs seen came within seconds of a VF plug after a migration (docs/lab.md)."""
    src = lab.where()
    dest = next(h for h in lab.state.hosts if h != src)
    before = l2_uptime(lab, "before the migration")
    within(2 * LIBVIRT_CALL_S, "whole NIC detach", lambda: lab.detach(src, WHOLE_ALIAS))
    within(4 * LIBVIRT_CALL_S, "migration", lambda: orch.migrate(lab, dest))
    migrated = l2_uptime(lab, "after the migration, before the whole NIC plug", before)
    attach_whole_nic(lab, dest)
    l2_uptime(lab, "after the whole NIC plug", migrated)
    return dest


def l2_uptime(lab: VfioLab, when: str, earlier: float = 0.0) -> float:
    """L2's uptime; VfioLabError naming *when* if L2 does not answer or has restarted
    since *earlier*: which step of a move L2 stopped at (the hangs came within a few
    plugs of a migration, and nothing checked L2 between the migration and the plug)."""
    out = lab.exec("cut -d' ' -f1 /proc/uptime", timeout=STALL_PROBE_S)
    if out.status != 0:
        raise VfioLabError(f"L2 does not answer {when}: {out.output.strip()[-300:]}")
    read = re.findall(r"^(\d+\.\d+)\s*$", out.output, re.M)
    if not read:
        raise VfioLabError(f"L2's uptime unreadable {when}: {out.output.strip()[-300:]}")
    uptime = float(read[-1])
    if uptime < earlier:
        raise L2Restarted(f"L2 restarted {when}: uptime {uptime:.1f} s, {earlier:.1f} s before")
    return uptime


def migration_due(number: int, every: int) -> bool:
    """Whether L2 migrates before iteration *number* (1-based): after every *every*
    iterations; never for 0."""
    return every > 0 and number > 1 and (number - 1) % every == 0


def run_loop(
    lab: VfioLab,
    result: LoopResult,
    iterations: int,
    budget_s: float,
    out: Path,
    migrate_every: int = 0,
    watch_only: bool = False,
) -> None:
    host = lab.where()
    deadline = time.monotonic() + budget_s
    uptime = 0.0
    for number in range(1, iterations + 1):
        if time.monotonic() > deadline:
            result.ended = "budget"
            return
        try:
            if migration_due(number, migrate_every):
                t0 = time.monotonic()
                try:
                    host = migrate_with_whole_nic(lab)
                except (VfioLabError, libvirt.libvirtError) as exc:
                    if isinstance(exc, (LibvirtTimeout, L2Restarted)) or not lab.answers():
                        raise
                    # a failed move is not the hang: record it, loop on without moves
                    migrate_every, host = 0, lab.where()
                    result.migrations.append(f"before {number}: failed, no more: {exc}")
                else:
                    took = time.monotonic() - t0
                    result.migrations.append(f"before {number}: to {host} in {took:.1f} s")
            if watch_only:
                it, uptime = watch_once(lab, number, uptime)
            else:
                it = one_iteration(lab, host, number)
        except Exception as exc:
            detail = f"{type(exc).__name__}: {str(exc)[:2000]}"
            if isinstance(exc, LibvirtTimeout):
                outcome = "libvirt-timeout"
            elif isinstance(exc, L2Restarted):
                outcome = "l2-restarted"
            else:
                outcome = "error" if lab.answers() else "l2-stalled"
            result.iterations.append(Iteration(number, "", outcome=outcome, detail=detail))
            result.ended = outcome
            # first: the stall report's own kvm trace reuses the recorder's buffer
            # first: the stall report's own kvm trace reuses the recorder's buffer
            try:
                recorded = lab.inside("flight-recorder", "tail", str(FLIGHT_TAIL), timeout=120)
                flight = recorded.output.strip()
            except Exception as tail_failed:  # the outcome stands without it
                flight = f"{type(tail_failed).__name__}: {tail_failed}"
            evidence = lab.evidence_or_why()  # the outcome stands without it
            result.l2_hang_signature = any(
                title == "L2 stall report" and is_l2_hang(text) for title, text in evidence
            )
            evidence.append(("L1 KVM flight recorder", flight))
            result.evidence = "\n".join(f"=== {t}\n{x}" for t, x in evidence) or "(none)"
            return
        result.iterations.append(it)
        result.save(out)
        log.info("iteration %d: %s", number, it)
    result.ended = "iterations"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(prog="lab.nested.hangloop", description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="control", help=f"one of {', '.join(VARIANTS)}, or a,b")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--budget-s", type=float, default=960.0, help="loop time, boot excluded")
    p.add_argument("--out", type=Path, required=True, help="the JSON result")
    p.add_argument("--no-ping", action="store_true", help="no ping at L2 during the loop")
    p.add_argument(
        "--migrate-every", type=int, default=0, help="migrate L2 after every N iterations"
    )
    p.add_argument("--prepared", action="store_true", help="VfioLab().prepare() ran")
    p.add_argument(
        "--kick-hz", type=float, default=0.0, help="stop/cont on L0's monitor per second"
    )
    p.add_argument(
        "--watch-only", action="store_true", help="no plugs: watch L2 under ping and kicks"
    )
    args = p.parse_args(argv)
    chosen = variant(args.variant)
    # an outer `timeout` ends the run through the finally below, which takes L1 down
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = LoopResult(chosen, time.time(), kick_hz=args.kick_hz)
    lab = VfioLab()
    kicker = Kicker(args.kick_hz) if args.kick_hz > 0 else None
    try:
        t0 = time.monotonic()
        lab.up(
            prepared=args.prepared,
            l1_cmdline_extra=chosen.l1,
            l2_cmdline_extra=chosen.l2,
            l2_pv_eoi=chosen.l2_pv_eoi,
        )
        result.boot_s = round(time.monotonic() - t0, 1)
        state = lab.state
        result.l1_kernel, result.l1_cmdline = state.l1_kernel, state.l1_cmdline
        result.l1_vcpus = state.l1_vcpus
        result.qemu, result.qemu_fixes = state.qemu, state.qemu_fixes
        result.kvm_amd, result.l2_cmdline = state.kvm_amd, state.l2_cmdline
        attach_whole_nic(lab, lab.where())
        if not args.no_ping:
            L1Pinger(lab, GUEST_IP, "hangloop", 100).start()
        lab.inside("flight-recorder", "start", timeout=60).check()
        result.save(args.out)
        if kicker is not None:
            kicker.start()
        try:
            run_loop(
                lab,
                result,
                args.iterations,
                args.budget_s,
                args.out,
                args.migrate_every,
                args.watch_only,
            )
        finally:
            if kicker is not None:
                result.kicks, result.kick_error = kicker.stop(), kicker.error
    except Exception as exc:
        result.ended = result.ended or f"lab error: {type(exc).__name__}: {str(exc)[:2000]}"
        raise
    finally:
        result.save(args.out)
        print(result.summary(), flush=True)
        # L1 first: a connection to a stuck libvirtd would block down()'s close; with L1
        # gone every call on it fails at once
        L1.stop()
        lab.down()
    return 1 if result.hang else 0


if __name__ == "__main__":
    sys.exit(main())
