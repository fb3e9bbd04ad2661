"""L1, the hypervisor VM: started on L0 with qemu-system-x86_64 directly, under TCG.

L0's QEMU here is the unpacked QEMU 11.1 of :mod:`lab.nested.qemu`, not the host's (whose
emulated igb VFs are not decoded once L1 maps them above 4 GiB).

::

   L0 QEMU hub 0: user net 10.0.2.0/24 (hostfwd 127.0.0.1:1661x -> 10.0.2.2x:16509)
                  L1 uplink (virtio)   igb A   igb B   e1000e A   e1000e B
   L1: ptmig-sw br-sw <- uplink, up0 of each host, cl0 of ptmig-client (lab.fabric)
       ptmig-hosta: igb A (PF, its VFs), e1000e A, br-g 10.0.2.21, mig0 192.0.2.1
       ptmig-hostb: igb B (PF, its VFs), e1000e B, br-g 10.0.2.22, mig0 192.0.2.2

One QEMU hub joins every wire, so the VFs, the whole NICs, the hosts' standby bridges and
the client share one L2 segment, and L0 needs no namespace or bridge of its own.
``intel-iommu`` comes before every PCI device (QEMU requires it), each passthrough NIC
sits behind its own root port so it gets its own IOMMU group.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lab.console import GuestConsole
from lab.hosts import is_alive, stop_pid
from lab.image import GuestImage
from lab.nested import LIBVIRT_PORTS, UPLINK_IPS, run_dir
from lab.nested.image import L1_CMDLINE
from lab.nested.qemu import UnpackedQemu

log = logging.getLogger(__name__)

L1_MEMORY_MIB = 4096
L1_VCPUS = 2
#: Overrides L1_VCPUS for a run (the L2 hang's measurements: docs/lab.md).
L1_VCPUS_ENV = "PTMIG_VLAB_L1_VCPUS"
BOOT_TIMEOUT = 180.0


@dataclass(frozen=True)
class WireNic:
    """A NIC L0 gives L1 for one lab host, on the hub."""

    host: str
    model: str  # igb (the SR-IOV PF) or e1000e (the whole NIC)
    mac: str  # the burned-in MAC: what a whole NIC resets to

    @property
    def netdev(self) -> str:
        return f"w-{self.model}-{self.host}"


#: Burned-in MACs differ per host, so a whole NIC's MAC changes with each migration.
WIRE_NICS = (
    WireNic("hosta", "igb", "52:54:00:f1:00:0a"),
    WireNic("hostb", "igb", "52:54:00:f1:00:0b"),
    WireNic("hosta", "e1000e", "52:54:00:e1:00:0a"),
    WireNic("hostb", "e1000e", "52:54:00:e1:00:0b"),
)
UPLINK_MAC = "52:54:00:f0:00:01"


@dataclass
class L1State:
    pid: int = 0
    started: float = 0.0
    image: str = ""

    @staticmethod
    def path() -> Path:
        return run_dir() / "l1.json"

    @classmethod
    def load(cls) -> L1State | None:
        try:
            return cls(**json.loads(cls.path().read_text()))
        except FileNotFoundError:
            return None

    def save(self) -> None:
        run_dir().mkdir(parents=True, exist_ok=True)
        self.path().write_text(json.dumps(asdict(self)))


@dataclass
class L1:
    """The running (or to be started) L1 VM."""

    image: GuestImage
    l2_disk: Path
    source_tree: Path
    qemu: UnpackedQemu
    extra_args: list[str] = field(default_factory=list)
    #: Appended to L1_CMDLINE at boot, not in the image (whose key holds L1_CMDLINE): a
    #: measurement's variant (``kvm_amd.vgif=0``) needs no image rebuild.
    cmdline_extra: str = ""
    vcpus: int = L1_VCPUS

    @property
    def console(self) -> GuestConsole:
        return GuestConsole(run_dir() / "console.sock", run_dir() / "console.log")

    def argv(self, overlay: Path) -> list[str]:
        fwd = ",".join(
            f"hostfwd=tcp:127.0.0.1:{LIBVIRT_PORTS[h]}-{UPLINK_IPS[h]}:16509" for h in LIBVIRT_PORTS
        )
        args = [
            *self.qemu.command(),
            "-name",
            "ptmig-vlab-l1",
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-smp",
            str(self.vcpus),
            "-m",
            str(L1_MEMORY_MIB),
            "-nodefaults",
            "-display",
            "none",
            "-device",
            "intel-iommu,intremap=on,caching-mode=on",
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            f"{L1_CMDLINE} {self.cmdline_extra}".strip(),
            "-drive",
            f"file={overlay},if=none,id=root,format=qcow2,cache=unsafe",
            "-device",
            "virtio-blk-pci,drive=root",
            "-drive",
            f"file={self.l2_disk},if=none,id=l2,format=raw,readonly=on",
            "-device",
            "virtio-blk-pci,drive=l2",
            "-virtfs",
            f"local,path={self.source_tree},mount_tag=src,security_model=none,readonly=on",
            "-virtfs",
            f"local,path={run_dir() / 'share'},mount_tag=vlab,security_model=none,readonly=on",
            "-netdev",
            f"user,id=slirp,net=10.0.2.0/24,{fwd}",
            "-netdev",
            "hubport,id=h-slirp,hubid=0,netdev=slirp",
            "-netdev",
            "hubport,id=h-uplink,hubid=0",
            "-device",
            f"virtio-net-pci,netdev=h-uplink,mac={UPLINK_MAC}",
            "-chardev",
            f"socket,id=con,path={run_dir() / 'console.sock'},server=on,wait=off,"
            f"logfile={run_dir() / 'console.log'}",
            "-serial",
            "chardev:con",
            "-chardev",
            f"socket,id=con2,path={run_dir() / 'console2.sock'},server=on,wait=off,"
            f"logfile={run_dir() / 'console2.log'}",
            "-serial",
            "chardev:con2",
            "-pidfile",
            str(run_dir() / "qemu.pid"),
            # L0's own monitor: lab.nested.kicker kicks L1's vCPUs through it
            "-qmp",
            f"unix:{qmp_socket()},server=on,wait=off",
        ]
        for i, nic in enumerate(WIRE_NICS, start=1):
            args += [
                "-netdev",
                f"hubport,id={nic.netdev},hubid=0",
                "-device",
                f"pcie-root-port,id=rp{i},chassis={i},slot={i}",
                "-device",
                f"{nic.model},bus=rp{i},netdev={nic.netdev},mac={nic.mac}",
            ]
        return args + self.extra_args

    def start(self) -> float:
        """Boot L1; return the seconds until its console shell answered."""
        old = L1State.load()
        if old and old.pid and is_alive(old.pid):
            raise RuntimeError(f"L1 runs already (pid {old.pid}): run 'ptmig-lab down --vfio'")
        run_dir().mkdir(parents=True, exist_ok=True)
        for f in ("console.sock", "console.log", "qemu.pid", "qmp.sock"):
            (run_dir() / f).unlink(missing_ok=True)
        overlay = run_dir() / "l1.qcow2"
        overlay.unlink(missing_ok=True)
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                str(self.image.disk),
                "-F",
                "raw",
                str(overlay),
            ],
            check=True,
        )
        out = (run_dir() / "qemu.stdout").open("ab")
        said_from = out.tell()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            self.argv(overlay),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=self.qemu.env(),
            start_new_session=True,
        )
        out.close()
        L1State(pid=proc.pid, started=time.time(), image=str(self.image.directory)).save()
        try:
            self.console.wait_for_shell(0, BOOT_TIMEOUT)
        except Exception as exc:
            self.stop()
            # QEMU refuses a bad device option on stderr and exits: say that, not a timeout
            with (run_dir() / "qemu.stdout").open("rb") as qemu_log:
                qemu_log.seek(said_from)
                said = qemu_log.read().decode(errors="replace").splitlines()[-3:]
            raise RuntimeError(f"L1 did not boot ({exc}); QEMU's last lines: {said}") from exc
        took = time.monotonic() - t0
        log.info("L1 up in %.1f s (pid %d)", took, proc.pid)
        return took

    @staticmethod
    def stop() -> str | None:
        state = L1State.load()
        if state is None or not state.pid:
            return None
        stop_pid(state.pid, timeout=10)
        L1State.path().unlink(missing_ok=True)
        (run_dir() / "l1.qcow2").unlink(missing_ok=True)
        return f"stopped L1 (pid {state.pid})"


def qmp_socket() -> Path:
    """L0's QMP socket of the running L1."""
    return run_dir() / "qmp.sock"


def running_pid() -> int | None:
    state = L1State.load()
    if state and state.pid and is_alive(state.pid):
        return state.pid
    return None


def src_path() -> Path:
    return Path(os.path.dirname(os.path.abspath(__file__))).parent.parent


def l1_vcpus() -> int:
    """L1's vCPU count for this run: ``$PTMIG_VLAB_L1_VCPUS`` or :data:`L1_VCPUS`."""
    value = os.environ.get(L1_VCPUS_ENV, "").strip()
    if not value:
        return L1_VCPUS
    if not value.isdigit() or not 1 <= int(value) <= 8:
        raise ValueError(f"${L1_VCPUS_ENV} must be 1-8, not {value!r}")
    return int(value)
