"""The nested lab's images: L1 (the hypervisor VM) and a fast-booting L2.

L1 is built like the lab guest (:mod:`lab.image`: a cached debootstrap base, ``mke2fs -d``,
direct kernel boot) plus QEMU 10 and libvirt 11 from bookworm-backports, for the reasons
in docs/lab.md.  It runs a shell script as init: libvirtd needs no systemd, and under
TCG every second of L1's boot is paid again by each test.

L2 is the lab guest image itself, booted with a small initramfs of our own: busybox, the
handful of modules needed to mount the root disk, and an init that replaces systemd (whose
udev coldplug and 90 s unit timeouts are what made a nested boot take 8-16 minutes).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lab.image import GuestImage, ImageRecipe, build_image, lab_recipe
from lab.image import mirror as debian_mirror
from lab.nested import cache_dir
from lab.nested.kernel import MTTY_IN_L1, build_mtty, selected_l1_kernel

log = logging.getLogger(__name__)

L1_PACKAGES: tuple[str, ...] = (
    "linux-image-amd64",
    "initramfs-tools",
    "udev",  # initramfs-tools needs it; L1's own init does not run udevd
    "kmod",
    "iproute2",
    "iputils-ping",
    "procps",
    "pciutils",
    "ethtool",
    "python3",
    "python3-libvirt",  # lab.hosts waits for its daemon with it
    "python3-pyroute2",
    "busybox-static",  # L2's initramfs
    # eu-stack: every libvirtd thread's stack when a host stops answering
    # (VfioLab.libvirtd_report); 2.8 MB with its libraries, where gdb is 11.6 MB and its
    # libsource-highlight4v5 dependency made debootstrap fail
    "elfutils",
)

L1_BACKPORTS: tuple[str, ...] = (
    "qemu-system-x86",
    "qemu-utils",
    "qemu-system-common",
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-daemon-driver-network",
    "libvirt-daemon-driver-nodedev",
    "libvirt-clients",
)

SHELL_READY = "PTMIG-SHELL-READY"
_PATH = "PATH=/usr/sbin:/usr/bin:/sbin:/bin"

#: Added to L1's init on the 6.12 kernel: the mtty sample as an mdev parent (hybrid path).
MTTY_LOAD = f"""modprobe mdev && insmod {MTTY_IN_L1}  # built by lab/nested/kernel.py
"""

#: L1's init: mounts, modules, the worktree over 9p, then a root shell on the console.
#: ``{modules}`` takes kernel-specific lines (none on 6.1, whose image key stays as it was).
L1_INIT_TEMPLATE = f"""#!/bin/sh
# ptmig nested lab: L1 init, run as PID 1 (no systemd; see lab/nested/image.py)
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mkdir -p /run/lock  # /var/lock: libvirt locks a channel's socket there (virDomainOpenChannel)
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
mount -o remount,rw /
mount -t cgroup2 cgroup2 /sys/fs/cgroup 2>/dev/null
hostname ptmig-l1
ip link set lo up
modprobe -a 9p 9pnet_virtio vfio-pci igb e1000e virtio_net tun bridge veth bonding 2>/dev/null
modprobe kvm_amd 2>/dev/null  # /dev/kvm for L2 when L0's TCG offers SVM
{{modules}}mkdir -p /mnt/src /mnt/vlab
mount -t 9p -o trans=virtio,version=9p2000.L,ro src /mnt/src
mount -t 9p -o trans=virtio,version=9p2000.L,ro vlab /mnt/vlab
echo "ptmig-l1-init: up at $(cut -d' ' -f1 /proc/uptime)" > /dev/ttyS0
# A second root shell on ttyS1, for looking around while ttyS0 runs a long command.
( while true; do
    setsid -c /bin/bash --norc --noprofile -i <>/dev/ttyS1 >&0 2>&1
  done ) &
while true; do
  setsid -c /bin/bash --norc --noprofile -c \\
    'stty -echo -onlcr cols 4000; export PS1= INPUTRC=/root/.inputrc {_PATH}; \\
     echo "{SHELL_READY} $(cut -d" " -f1 /proc/uptime)"; exec /bin/bash --norc --noprofile -i' \\
    <>/dev/ttyS0 >&0 2>&1
done
"""

L1_CMDLINE = (
    "root=/dev/vda rw console=ttyS0,115200 intel_iommu=on loglevel=4 panic=-1 "
    "init=/sbin/ptmig-l1-init"
)


def l1_recipe(kernel: str = "6.1") -> ImageRecipe:
    """L1's image for *kernel* (:data:`lab.nested.kernel.L1_KERNELS`); 6.12 builds ``mtty.ko``
    first and installs the exact kernel package it was built against."""
    backports = L1_BACKPORTS
    binary: dict[str, Path] = {}
    modules = ""
    if kernel == "6.12":
        mtty = build_mtty()
        backports = (*L1_BACKPORTS, mtty.image_package)
        binary = {MTTY_IN_L1: mtty.ko}
        modules = MTTY_LOAD
    elif kernel != "6.1":  # Debian 12's own: linux-image-amd64 of L1_PACKAGES
        raise ValueError(f"no L1 image for kernel {kernel!r}")
    return ImageRecipe(
        packages=L1_PACKAGES,
        backports=backports,
        files={
            "/etc/hostname": "ptmig-l1\n",
            "/etc/hosts": "127.0.0.1 localhost\n",
            "/etc/fstab": "/dev/vda / ext4 rw,noatime 0 0\n",
            "/sbin/ptmig-l1-init": L1_INIT_TEMPLATE.format(modules=modules),
            # A program reads the console: no bracketed-paste escapes around each command.
            "/root/.inputrc": "set enable-bracketed-paste off\n",
            "/etc/ptmig-l1-cmdline": L1_CMDLINE + "\n",  # in the key: a new cmdline rebuilds
        },
        masked_units=(),
        enabled_units=(),
        size="4G",
        binary_files=binary,
    )


def l1_cache(kernel: str) -> Path:
    """One directory per kernel: a build prunes its directory's other images, and switching
    kernels must not throw the other one away."""
    return cache_dir() / "l1" if kernel == "6.1" else cache_dir() / f"l1-{kernel}"


def build_l1(kernel: str | None = None) -> GuestImage:
    """L1's image for *kernel* (default: :func:`lab.nested.kernel.selected_l1_kernel`)."""
    kernel = kernel or selected_l1_kernel()
    recipe = l1_recipe(kernel)
    image = build_image(recipe, l1_cache(kernel))
    booted = str(image.manifest["kernel"]).removeprefix("vmlinuz-")
    if not booted.startswith(kernel + "."):
        raise RuntimeError(f"L1 image {image.directory} boots {booted}, not {kernel}")
    return image


def build_l2() -> GuestImage:
    """The lab guest image, unchanged, in this lab's own cache directory."""
    return build_image(lab_recipe(), cache_dir() / "l2")


#: Modules L2's initramfs loads to mount its root (virtio-blk over virtio-pci, ext4).
#: ext4 needs crc32c (a softdep modprobe.d would resolve: "softdep ext4 pre: crypto-crc32c").
L2_ROOT_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")


@dataclass(frozen=True)
class L2Boot:
    """What L1's libvirt boots L2 with."""

    kernel: Path
    initrd: Path
    disk: Path


def build_l2_initrd(l1: GuestImage, l2: GuestImage, init_script: str, out: Path) -> Path:
    """A newc cpio: busybox from L1's image, L2's root modules, and an /init that mounts
    the root disk and hands over to *init_script* (copied into the root as /ptmig-init)."""
    base = _base_of(l1)
    kver = l2.manifest["kernel"]
    assert isinstance(kver, str)
    version = kver.removeprefix("vmlinuz-")
    moddir = base / "lib" / "modules" / version
    if not moddir.exists():
        raise RuntimeError(f"L1's base has no modules for L2's kernel {version} ({moddir})")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "newroot", f"lib/modules/{version}"):
            (root / d).mkdir(parents=True)
        shutil.copy2(base / "bin" / "busybox", root / "bin" / "busybox")
        for name in (
            "sh",
            "mount",
            "switch_root",
            "modprobe",
            "insmod",
            "mkdir",
            "cp",
            "cat",
            "echo",
            "sleep",
            "umount",
        ):
            (root / "bin" / name).symlink_to("busybox")
        wanted = _module_closure(moddir, L2_ROOT_MODULES)
        for rel in wanted:
            dest = root / "lib" / "modules" / version / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(moddir / rel, dest)
        for f in ("modules.dep", "modules.alias", "modules.builtin", "modules.order"):
            if (moddir / f).exists():
                shutil.copy2(moddir / f, root / "lib" / "modules" / version / f)
        (root / "ptmig-init").write_text(init_script)
        (root / "ptmig-init").chmod(0o755)
        (root / "init").write_text(_initramfs_init(L2_ROOT_MODULES))
        (root / "init").chmod(0o755)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(newc_archive(root))
    return out


def newc_archive(root: Path) -> bytes:
    """The tree under *root* as a newc cpio archive (what the kernel unpacks as initramfs)."""
    chunks: list[bytes] = []

    def entry(name: str, mode: int, data: bytes, ino: int) -> None:
        head = (
            f"070701{ino:08x}{mode:08x}{0:08x}{0:08x}{1:08x}{0:08x}{len(data):08x}"
            f"{0:08x}{0:08x}{0:08x}{0:08x}{len(name) + 1:08x}{0:08x}"
        )
        blob = head.encode() + name.encode() + b"\0"
        blob += b"\0" * (-len(blob) % 4) + data
        chunks.append(blob + b"\0" * (-len(blob) % 4))

    ino = 1
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        st = path.lstat()
        if path.is_symlink():
            entry(rel, st.st_mode, os.readlink(path).encode(), ino)
        elif path.is_dir():
            entry(rel, st.st_mode, b"", ino)
        else:
            entry(rel, st.st_mode, path.read_bytes(), ino)
        ino += 1
    entry("TRAILER!!!", 0, b"", 0)
    return b"".join(chunks)


def _initramfs_init(modules: tuple[str, ...]) -> str:
    return f"""#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in {" ".join(modules)}; do modprobe $m; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
mount -t ext4 -o rw,noatime /dev/vda /newroot || {{
  echo "ptmig initramfs: cannot mount /dev/vda"; cat /proc/modules; sh; }}
cp /ptmig-init /newroot/ptmig-init
umount /proc /sys /dev
exec switch_root /newroot /ptmig-init
"""


def _module_closure(moddir: Path, names: tuple[str, ...]) -> list[str]:
    """Relative paths of *names* and all their dependencies, per modules.dep."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.split(".ko")[0].replace("-", "_")] = mod
    builtin_list = moddir / "modules.builtin"
    builtin = builtin_list.read_text() if builtin_list.exists() else ""
    seen: list[str] = []
    todo = []
    for n in names:
        if n in by_name:
            todo.append(by_name[n])
        elif f"/{n}.ko" not in builtin:
            raise RuntimeError(f"module {n} neither built in nor in {moddir}")
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.append(m)
        todo.extend(deps.get(m, []))
    return seen


def _base_of(image: GuestImage) -> Path:
    base = image.directory.parent / f"base-{image.manifest['base']}"
    if not base.exists():
        raise RuntimeError(f"the base of {image.directory} is gone ({base})")
    return base


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    log.info("mirror %s", debian_mirror())
    l1 = build_l1()
    log.info("L1 image %s", l1.directory)
    l2 = build_l2()
    log.info("L2 image %s", l2.directory)


if __name__ == "__main__":
    os.umask(0o022)
    main()
