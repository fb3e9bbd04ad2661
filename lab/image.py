"""The lab's Debian 12 guest image: debootstrap, configure, ext4 image without loop devices.

Built in two cached layers under ``~/.cache/ptmig/images`` so that a rebuild only redoes
what changed:

* the *base* root filesystem (debootstrap; the slow part, about two minutes), keyed by
  suite, mirror and package list;
* the *image* (base + lab configuration + extra .deb files, turned into a raw ext4 file
  with ``mke2fs -d`` and the kernel and initrd copied beside it for direct kernel boot),
  keyed by the base key, the configuration files and the hashes of the extra packages.

Each boot gets its own throw-away qcow2 overlay on top of the raw file (see
:mod:`lab.guest`), so the cached image is never written to.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lab import (
    GUEST_IP,
    GUEST_PREFIX,
    STANDBY_MAC,
    TEAM_MAC,
    WAN_GUEST_IP,
    WAN_PRIMARY_MAC,
    WAN_STANDBY_MAC,
)
from lab.paths import cache_dir
from lab.run import run

log = logging.getLogger(__name__)

SUITE = "bookworm"

GUEST_PACKAGES: tuple[str, ...] = (
    "systemd-sysv",
    "udev",  # creates /dev/virtio-ports/<name> and loads drivers of hot-plugged NICs
    "kmod",
    "linux-image-amd64",
    "initramfs-tools",
    "python3",
    "python3-grpcio",
    "python3-protobuf",
    "python3-pyroute2",
    "iproute2",
    "iputils-ping",
    "procps",
    "ethtool",
    "pciutils",
)

#: The Debian suites the lab's guest comes in: the packages each base is made of.
#: debootstrap does not follow a dependency satisfied only by a Provides: trixie's
#: python3-grpcio depends on libre2-11-absl20240722, which libre2-11 provides, so it is named.
GUEST_SUITES: dict[str, tuple[str, ...]] = {
    "bookworm": GUEST_PACKAGES,
    "trixie": (*GUEST_PACKAGES, "libre2-11"),
}
DEFAULT_SUITE = SUITE

#: Installed with apt from the suite's own archive into the lab *image* (not the base: the
#: clean-root install test needs a stock base): the host side's Debian libraries, so that
#: tests/e2e/test_ptmigd_unit.py can run ptmigd from its unit under the guest's systemd.
#: Debian 12 only, the host package's reference distribution.
GUEST_ARCHIVE_PACKAGES: dict[str, tuple[str, ...]] = {
    "bookworm": ("python3-libvirt", "python3-prometheus-client"),
}

#: Printed by the serial console's login shell once the guest is up; the console
#: driver waits for it after a boot.
SHELL_READY_MARKER = "PTMIG-SHELL-READY"

BOOT_CMDLINE = "root=/dev/vda rw console=ttyS0,115200 loglevel=4 panic=0 net.ifnames=1"


def _guest_files() -> dict[str, str]:
    """Files written into the guest root, path -> content.

    The team is *admin-owned*: the bond and its address come from the guest's own
    systemd-networkd configuration, as on a real image; ptmig only switches members.
    The bond's MAC is fixed so udev's MACAddressPolicy=persistent does not invent one.
    """
    return {
        "/etc/hostname": "ptmig-guest\n",
        "/etc/hosts": "127.0.0.1 localhost\n127.0.1.1 ptmig-guest\n",
        "/etc/fstab": "/dev/vda / ext4 rw,noatime 0 0\n",
        "/etc/systemd/journald.conf.d/volatile.conf": "[Journal]\nStorage=volatile\n",
        "/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf": (
            "[Service]\nExecStart=\n"
            "ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud "
            "115200,57600,38400,9600 %I dumb\n"
        ),
        # The console is driven by a program: no echo, a fixed prompt, and a kernel that
        # prints on it only in an emergency (an oops or a panic raises the level itself):
        # a netdev error printed in the middle of a command's output made it unparseable.
        # Everything else is in dmesg, which the lab reads.
        "/root/.bashrc": (
            'if [ "$(tty)" = /dev/ttyS0 ]; then\n'
            "  stty -echo -onlcr cols 4000\n"
            "  PS1=''\n"
            "  dmesg -n 1\n"
            f'  echo "{SHELL_READY_MARKER} $(cut -d" " -f1 /proc/uptime)"\n'
            "fi\n"
        ),
        # The bond is skipped when the kernel command line says ptmig.failover: that boot
        # is the upstream comparison (QEMU failover + net_failover pair the NICs instead).
        "/etc/systemd/network/10-bond0.netdev": (
            "[Match]\nKernelCommandLine=!ptmig.failover\n\n"
            "[NetDev]\nName=bond0\nKind=bond\n"
            f"MACAddress={TEAM_MAC}\n\n"
            "[Bond]\nMode=active-backup\nMIIMonitorSec=100ms\nFailOverMACPolicy=none\n"
        ),
        "/etc/systemd/network/20-standby.network": (
            f"[Match]\nPermanentMACAddress={STANDBY_MAC}\n"
            "KernelCommandLine=!ptmig.failover\n\n[Network]\nBond=bond0\n"
        ),
        "/etc/systemd/network/40-failover.network": (
            "[Match]\nName=enp1s0\nKernelCommandLine=ptmig.failover\n\n"
            f"[Network]\nAddress={GUEST_IP}/{GUEST_PREFIX}\n"
            "ConfigureWithoutCarrier=yes\nLinkLocalAddressing=ipv6\n"
        ),
        "/etc/systemd/network/30-bond0.network": (
            "[Match]\nName=bond0\n\n"
            f"[Network]\nAddress={GUEST_IP}/{GUEST_PREFIX}\n"
            "ConfigureWithoutCarrier=yes\nLinkLocalAddressing=ipv6\n"
        ),
        # Team wan's bond is made by the agent; networkd only puts the address on it.
        "/etc/systemd/network/30-bond1.network": (
            "[Match]\nName=bond1\n\n"
            f"[Network]\nAddress={WAN_GUEST_IP}/{GUEST_PREFIX}\n"
            "ConfigureWithoutCarrier=yes\nLinkLocalAddressing=ipv6\n"
        ),
        "/etc/ptmig/agent.toml": AGENT_CONFIG,
        # Extra guests (lab.guest.ExtraGuest) boot this image too, each with its own MACs
        # and address on the kernel command line: a unit rewrites these templates into
        # place before networkd and the agent start.  The main guest's command line has
        # no ptmig.standby=, so the unit is skipped there.
        **{
            f"{EXTRA_TEMPLATES}{path}": content
            for path, content in _extra_guest_files(EXTRA_STANDBY, EXTRA_ADDRESS).items()
        },
        IDENTITY_SCRIPT: _IDENTITY_SCRIPT,
        f"/etc/systemd/system/{IDENTITY_UNIT}": _IDENTITY_UNIT_FILE,
        # vsock_loopback: this machine has no vhost-vsock, so the guest's own vsock loopback
        # stands in for the host in the vsock tests.  Loaded at boot: a connection in the
        # first second after a late modprobe was seen reset once.
        "/etc/modules-load.d/ptmig-lab.conf": "bonding\nvsock_loopback\n",
        "/etc/modprobe.d/ptmig-lab-bonding.conf": "options bonding max_bonds=0\n",
    }


#: Where an extra guest's files wait as templates, and their placeholders.
EXTRA_TEMPLATES = "/usr/local/share/ptmig-lab/extra-guest"
EXTRA_STANDBY = "@STANDBY@"
EXTRA_ADDRESS = "@ADDRESS@"
IDENTITY_SCRIPT = "/usr/local/sbin/ptmig-lab-identity"
IDENTITY_UNIT = "ptmig-lab-identity.service"


def _extra_guest_files(standby: str, address: str) -> dict[str, str]:
    """An extra guest's own files: team lan only (bond0 on its standby *standby*, address
    *address* as ip/prefix), the main guest's lan files with another MAC and address."""
    return {
        "/etc/systemd/network/10-bond0.netdev": (
            "[Match]\nKernelCommandLine=!ptmig.failover\n\n"
            "[NetDev]\nName=bond0\nKind=bond\n"
            f"MACAddress={standby}\n\n"
            "[Bond]\nMode=active-backup\nMIIMonitorSec=100ms\nFailOverMACPolicy=none\n"
        ),
        "/etc/systemd/network/20-standby.network": (
            f"[Match]\nPermanentMACAddress={standby}\n"
            "KernelCommandLine=!ptmig.failover\n\n[Network]\nBond=bond0\n"
        ),
        "/etc/systemd/network/30-bond0.network": (
            "[Match]\nName=bond0\n\n"
            f"[Network]\nAddress={address}\n"
            "ConfigureWithoutCarrier=yes\nLinkLocalAddressing=ipv6\n"
        ),
        "/etc/ptmig/agent.toml": (
            "# ptmig lab: an extra guest\n[[teams]]\n"
            'name = "lan"\nbond = "bond0"\n'
            f'standby = {{mac = "{standby}"}}\n'
            'mac_policy = "preserve"\nownership = "admin"\n'
        ),
    }


_IDENTITY_SCRIPT = f"""#!/bin/sh
# ptmig lab: an extra guest's own standby MAC and address, from the kernel command line
# (ptmig.standby=MAC ptmig.address=IP/PREFIX), written over the main guest's files before
# systemd-networkd and the agent read them.  The overlay disk is this guest's own.
set -eu
standby=
address=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        ptmig.standby=*) standby=${{arg#ptmig.standby=}} ;;
        ptmig.address=*) address=${{arg#ptmig.address=}} ;;
    esac
done
if [ -z "$standby" ] || [ -z "$address" ]; then
    echo "ptmig-lab-identity: ptmig.standby= and ptmig.address= are both needed" >&2
    exit 1
fi
cd {EXTRA_TEMPLATES}
for f in $(find . -type f); do
    sed -e "s|{EXTRA_STANDBY}|$standby|g" -e "s|{EXTRA_ADDRESS}|$address|g" "$f" > "/${{f#./}}"
done
rm -f /etc/systemd/network/30-bond1.network
"""

_IDENTITY_UNIT_FILE = f"""[Unit]
Description=ptmig lab: this extra guest's MACs and address, from the kernel command line
DefaultDependencies=no
ConditionKernelCommandLine=ptmig.standby
After=systemd-remount-fs.service
Before=systemd-networkd.service ptmig-agent.service network-pre.target sysinit.target

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={IDENTITY_SCRIPT}

[Install]
WantedBy=sysinit.target
"""


#: The agent's configuration in the lab guest: the two teams, one per ownership mode and
#: MAC policy.  Written after the package is installed, as an admin would edit it.
AGENT_CONFIG = f"""# ptmig lab guest
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
mac_policy = "follow"
ownership = "agent"
primary = {{mac = "{WAN_PRIMARY_MAC}"}}
"""

#: Units that only cost boot time in a test guest.
MASKED_UNITS: tuple[str, ...] = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
    "man-db.timer",
    "systemd-networkd-wait-online.service",
    "getty@tty1.service",
)

ENABLED_UNITS: tuple[str, ...] = ("systemd-networkd.service", IDENTITY_UNIT)


def mirror() -> str:
    """The machine's configured Debian mirror, so the lab uses what apt uses."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split(":", 1)[1].strip().split()[0]
    return "http://deb.debian.org/debian"


def _digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class GuestImage:
    """A built image: what the guest domain boots."""

    directory: Path

    @property
    def disk(self) -> Path:
        return self.directory / "root.raw"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"

    @property
    def manifest(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.directory / "manifest.json").read_text())
        return data


@dataclass(frozen=True)
class ImageRecipe:
    """Everything that decides an image's content; its digest is the cache key."""

    suite: str = SUITE
    mirror: str = field(default_factory=mirror)
    packages: tuple[str, ...] = GUEST_PACKAGES
    files: Mapping[str, str] = field(default_factory=_guest_files)
    masked_units: tuple[str, ...] = MASKED_UNITS
    enabled_units: tuple[str, ...] = ENABLED_UNITS
    extra_debs: Sequence[Path] = ()
    size: str = "2G"
    #: Installed into the base from bookworm-backports (the nested lab's QEMU and libvirt).
    backports: tuple[str, ...] = ()
    #: Installed into the image from the suite's archive (apt, so dependencies follow).
    archive_packages: tuple[str, ...] = ()
    #: Copied into the image as they are (path in the image -> file here), keyed by content:
    #: the nested L1's out-of-tree ``mtty.ko``.
    binary_files: Mapping[str, Path] = field(default_factory=dict)

    def base_key(self) -> str:
        key: dict[str, object] = {
            "suite": self.suite,
            "mirror": self.mirror,
            "packages": self.packages,
        }
        if self.backports:
            key["backports"] = self.backports
        return _digest(key)

    def image_key(self) -> str:
        key: dict[str, object] = {
            "base": self.base_key(),
            "files": dict(self.files),
            "masked": self.masked_units,
            "enabled": self.enabled_units,
            "debs": [_file_digest(p) for p in self.extra_debs],
            "size": self.size,
            "cmdline": BOOT_CMDLINE,
        }
        if self.archive_packages:  # only then: other images keep their cached key
            key["archive"] = self.archive_packages
        if self.binary_files:  # likewise
            key["binary"] = {k: _file_digest(v) for k, v in sorted(self.binary_files.items())}
        return _digest(key)


def build_agent_package() -> Path:
    """The agent's .deb, built from this checkout the way a release is built."""
    out_dir = cache_dir() / "packages"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    script = Path(__file__).resolve().parent.parent / "scripts" / "build-packages.sh"
    printed = run(
        [str(script), "agent", str(out_dir)],
        capture=True,
        env={**os.environ, "PTMIG_PACKAGERS": "deb"},
    )
    debs = [Path(line) for line in printed.split() if line.endswith(".deb")]
    if len(debs) != 1:
        raise RuntimeError(f"expected one .deb from {script}, got: {printed!r}")
    return debs[0]


def lab_recipe(suite: str = DEFAULT_SUITE) -> ImageRecipe:
    """The lab guest of `suite`: its base packages plus the agent package of this checkout."""
    if suite not in GUEST_SUITES:
        raise ValueError(f"no lab guest for suite {suite!r} (one of {sorted(GUEST_SUITES)})")
    return ImageRecipe(
        suite=suite,
        packages=GUEST_SUITES[suite],
        extra_debs=(build_agent_package(),),
        archive_packages=GUEST_ARCHIVE_PACKAGES.get(suite, ()),
    )


def images_dir() -> Path:
    return cache_dir() / "images"


def suite_images_dir(suite: str) -> Path:
    """Where `suite`'s base and image are cached: one directory each, so that building one
    suite's image does not prune the other's."""
    return images_dir() if suite == DEFAULT_SUITE else images_dir() / suite


def build_image(recipe: ImageRecipe | None = None, directory: Path | None = None) -> GuestImage:
    """Return the cached image for *recipe*, building what is missing.

    *directory* (default :func:`images_dir`) holds one base and one image: a build there
    prunes the others, so each kind of image gets its own directory.
    """
    recipe = recipe or ImageRecipe()
    where = directory or images_dir()
    target = where / f"image-{recipe.image_key()}"
    if (target / "manifest.json").exists():
        log.info("guest image cached: %s", target)
        return GuestImage(target)
    base = _build_base(recipe, where)
    where.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=where, prefix="staging-") as tmp:
        staging = Path(tmp)
        rootfs = staging / "rootfs"
        log.info("configuring guest root filesystem")
        run(["cp", "-a", "--reflink=auto", str(base), str(rootfs)])
        _configure(rootfs, recipe)
        out = staging / "image"
        out.mkdir()
        kernels = sorted((rootfs / "boot").glob("vmlinuz-*"))
        initrds = sorted((rootfs / "boot").glob("initrd.img-*"))
        if not kernels or not initrds:
            raise RuntimeError(f"no kernel or initrd in {rootfs / 'boot'}")
        shutil.copy2(kernels[-1], out / "vmlinuz")
        shutil.copy2(initrds[-1], out / "initrd.img")
        log.info("making the ext4 image (mke2fs -d, no loop device)")
        run(
            [
                "mke2fs",
                "-q",
                "-t",
                "ext4",
                "-L",
                "ptmig-root",
                "-d",
                str(rootfs),
                str(out / "root.raw"),
                recipe.size,
            ]
        )
        manifest = {
            "key": recipe.image_key(),
            "base": recipe.base_key(),
            "suite": recipe.suite,
            "mirror": recipe.mirror,
            "kernel": kernels[-1].name,
            "packages": _package_versions(rootfs),
            "extra_debs": [p.name for p in recipe.extra_debs],
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        shutil.rmtree(rootfs)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)
    _prune(where, keep={target.name, base.name})
    log.info("guest image built: %s", target)
    return GuestImage(target)


def base_root() -> Path:
    """The cached debootstrap root the guest image starts from: a stock Debian 12."""
    return _build_base(ImageRecipe(), images_dir())


def _build_base(recipe: ImageRecipe, where: Path) -> Path:
    base = where / f"base-{recipe.base_key()}"
    if (base / "etc" / "debian_version").exists() and (base / ".ptmig-complete").exists():
        return base
    where.mkdir(parents=True, exist_ok=True)
    partial = base.with_name(base.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    log.info("debootstrap %s from %s (takes about two minutes)", recipe.suite, recipe.mirror)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(recipe.packages),
            recipe.suite,
            str(partial),
            recipe.mirror,
        ]
    )
    if recipe.backports:
        _install_backports(partial, recipe)
    run(["chroot", str(partial), "apt-get", "clean"])
    (partial / ".ptmig-complete").touch()
    if base.exists():
        shutil.rmtree(base)
    partial.rename(base)
    return base


def _install_backports(rootfs: Path, recipe: ImageRecipe) -> None:
    """apt in the chroot, from the same mirror's bookworm-backports suite."""
    (rootfs / "etc/apt/sources.list.d/backports.list").write_text(
        f"deb {recipe.mirror} {recipe.suite}-backports main\n"
    )
    _apt_install(rootfs, recipe.backports, ["-t", f"{recipe.suite}-backports"])


def _apt_install(rootfs: Path, packages: Sequence[str], options: Sequence[str] = ()) -> None:
    """apt-get install in the chroot, from the archives its sources list names.

    policy-rc.d keeps package scripts from starting daemons in the build machine.
    """
    policy = rootfs / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run(["chroot", str(rootfs), "apt-get", "update", "-q"], env=env)
        run(
            [
                "chroot",
                str(rootfs),
                "apt-get",
                *options,
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                *packages,
            ],
            env=env,
            timeout=1800,
        )
        run(["chroot", str(rootfs), "apt-get", "clean"], env=env)
    finally:
        policy.unlink()


def _configure(rootfs: Path, recipe: ImageRecipe) -> None:
    (rootfs / ".ptmig-complete").unlink(missing_ok=True)
    chroot = ["chroot", str(rootfs)]
    if recipe.archive_packages:
        log.info("installing %s from the archive", ", ".join(recipe.archive_packages))
        _apt_install(rootfs, recipe.archive_packages)
    for deb in recipe.extra_debs:
        inside = Path("/tmp") / deb.name
        shutil.copy2(deb, rootfs / inside.relative_to("/"))
        # dpkg in the chroot, as a user would install it; dependencies are already there.
        run(
            [*chroot, "dpkg", "-i", str(inside)],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        (rootfs / inside.relative_to("/")).unlink()
    # After the packages: these are the admin's edits (the agent's config among them).
    for path, content in recipe.files.items():
        dest = rootfs / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(content)
        if content.startswith("#!"):  # a script (the nested lab's inits)
            dest.chmod(0o755)
    for path, source in recipe.binary_files.items():
        dest = rootfs / path.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
    run([*chroot, "passwd", "-d", "root"])
    if recipe.enabled_units:
        run([*chroot, "systemctl", "enable", *recipe.enabled_units])
    if recipe.masked_units:
        run([*chroot, "systemctl", "mask", *recipe.masked_units])


def _package_versions(rootfs: Path) -> dict[str, str]:
    wanted = (
        "linux-image-amd64",
        "systemd",
        "python3",
        "python3-grpcio",
        "python3-protobuf",
        "python3-pyroute2",
        "iproute2",
        "ptmig-agent",
    )
    out = run(
        ["chroot", str(rootfs), "dpkg-query", "-W", "-f=${Package} ${Version}\n", *wanted],
        capture=True,
        check=False,
    )
    return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)


def _prune(where: Path, keep: set[str]) -> None:
    """Drop older images and bases so the cache holds one of each."""
    for entry in where.iterdir():
        if entry.name in keep or entry.name.startswith("staging-"):
            continue
        if entry.name.startswith(("image-", "base-")):
            log.info("removing old cached %s", entry)
            shutil.rmtree(entry, ignore_errors=True)
