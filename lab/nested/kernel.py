"""L1's kernel: Debian 12's own 6.1 (the default), or bookworm-backports' generic 6.12 with
the kernel's ``mtty`` sample built out of tree for it.

Why 6.12: ``mtty`` (samples/vfio-mdev/mtty.c) is an emulated mdev serial port that
implements the VFIO migration interface since Linux 6.7 (STOP_COPY, PRE_COPY, P2P): a
migratable VFIO device without hardware, for the hybrid path (issue 26).  Debian builds no
samples, so the module is built here from the same version's ``linux-source`` against its
headers.  Only the *generic* flavour has ``CONFIG_VFIO_MDEV=m`` (the cloud one has no mdev).

The build runs on L0, not in L1 (TCG makes that slow): bookworm-backports' 6.12 headers
depend on gcc-12, which is Debian 12's compiler.  The headers, kbuild tools and source are
fetched with :class:`lab.nested.debs.PrivateApt` and unpacked under a staging directory,
so nothing is installed on the host.  Cached under ``~/.cache/ptmig/vfio/mtty/mtty-<key>/``
(the key a hash of :class:`MttyRecipe`); the manifest pins the kernel package version that
L1's image then installs, so module and kernel always match.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.image import mirror
from lab.nested import cache_dir
from lab.nested.debs import PrivateApt, recipe_key, unpack

log = logging.getLogger(__name__)

#: The kernels L1 can boot; the environment variable picks one (opt-in until proven).
L1_KERNELS = ("6.1", "6.12")
DEFAULT_L1_KERNEL = "6.1"
L1_KERNEL_ENV = "PTMIG_VLAB_L1_KERNEL"

#: Where L1's image keeps the module (insmod by path: no depmod run in the image).
MTTY_IN_L1 = "/usr/local/lib/ptmig/mtty.ko"


def selected_l1_kernel() -> str:
    """The L1 kernel this run uses: ``$PTMIG_VLAB_L1_KERNEL`` or the default."""
    kernel = os.environ.get(L1_KERNEL_ENV, "") or DEFAULT_L1_KERNEL
    if kernel not in L1_KERNELS:
        raise ValueError(f"{L1_KERNEL_ENV}={kernel!r}: one of {', '.join(L1_KERNELS)}")
    return kernel


@dataclass(frozen=True)
class MttyRecipe:
    """What the module is built from: *metapackage*'s kernel in *backports* of *mirror*."""

    backports: str = "bookworm-backports"
    #: The generic flavour: the cloud flavour has no CONFIG_VFIO_MDEV.
    metapackage: str = "linux-image-amd64"
    source_file: str = "samples/vfio-mdev/mtty.c"
    mirror: str = ""

    def key(self) -> str:
        return recipe_key(self)


@dataclass(frozen=True)
class MttyModule:
    """A built ``mtty.ko`` and the exact kernel package it was built for."""

    root: Path

    @property
    def manifest(self) -> dict[str, str]:
        data: dict[str, str] = json.loads((self.root / "manifest.json").read_text())["kernel"]
        return data

    @property
    def ko(self) -> Path:
        return self.root / "mtty.ko"

    @property
    def release(self) -> str:
        """``uname -r`` of the kernel it loads into, e.g. ``6.12.95+deb12-amd64``."""
        return self.manifest["release"]

    @property
    def image_package(self) -> str:
        """The kernel package pinned to the version the module was built against."""
        return f"linux-image-{self.release}={self.manifest['version']}"


def mtty_dir() -> Path:
    return cache_dir() / "mtty"


def build_mtty(recipe: MttyRecipe | None = None) -> MttyModule:
    """The cached module for *recipe*, fetching and building it when missing (about 30 s)."""
    recipe = recipe or MttyRecipe(mirror=mirror())
    target = mtty_dir() / f"mtty-{recipe.key()}"
    if (target / "manifest.json").exists():
        return MttyModule(target)
    mtty_dir().mkdir(parents=True, exist_ok=True)
    for old in mtty_dir().glob("mtty-*"):
        shutil.rmtree(old, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=mtty_dir(), prefix="staging-") as tmp:
        staging = Path(tmp)
        apt = PrivateApt(staging / "apt", recipe.mirror, (recipe.backports,))
        kernel = _resolve(apt, recipe.metapackage)
        log.info("building mtty.ko for %s (%s)", kernel["release"], kernel["version"])
        gcc = _compiler(apt, kernel)
        abi = kernel["release"].removesuffix("-amd64")
        series = ".".join(kernel["release"].split(".")[:2])
        v = kernel["version"]
        debs = apt.download(
            [
                f"linux-headers-{kernel['release']}={v}",
                f"linux-headers-{abi}-common={v}",
                f"linux-kbuild-{abi}={v}",
                f"linux-source-{series}={v}",
            ]
        )
        tree = staging / "tree"
        unpack(debs, tree)
        headers = tree / "usr/src" / f"linux-headers-{kernel['release']}"
        config = (headers / ".config").read_text()
        if "CONFIG_VFIO_MDEV=m" not in config and "CONFIG_VFIO_MDEV=y" not in config:
            raise RuntimeError(f"{kernel['release']} has no CONFIG_VFIO_MDEV: mtty cannot load")
        # The flavour's Makefile includes the common headers by their installed path.
        makefile = headers / "Makefile"
        makefile.write_text(makefile.read_text().replace("/usr/src/", f"{tree}/usr/src/"))
        build = staging / "build"
        build.mkdir()
        subprocess.run(
            [
                "tar",
                "-xJf",
                str(tree / "usr/src" / f"linux-source-{series}.tar.xz"),
                "-C",
                str(build),
                "--strip-components=3",
                f"linux-source-{series}/{recipe.source_file}",
            ],
            check=True,
        )
        (build / "Makefile").write_text("obj-m := mtty.o\n")
        # No module BTF: pahole (dwarves) is not on L0, and nothing here reads it.
        subprocess.run(
            ["make", "-C", str(headers), f"M={build}", "CONFIG_DEBUG_INFO_BTF_MODULES=", "modules"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        vermagic = _modinfo(build / "mtty.ko", "vermagic")
        if vermagic.split()[0] != kernel["release"]:
            raise RuntimeError(f"mtty.ko built for {vermagic!r}, not {kernel['release']}")
        out = staging / "out"
        out.mkdir()
        shutil.copy2(build / "mtty.ko", out / "mtty.ko")
        shutil.copy2(build / "mtty.c", out / "mtty.c")
        manifest = {
            "key": recipe.key(),
            "recipe": asdict(recipe),
            "kernel": {**kernel, "gcc": gcc},
            "vermagic": vermagic,
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
        out.rename(target)
    return MttyModule(target)


def _resolve(apt: PrivateApt, metapackage: str) -> dict[str, str]:
    """The kernel package *metapackage* stands for: its release and version."""
    depends = apt.field(metapackage, "Depends")
    m = re.match(r"linux-image-(\S+) \(= (\S+)\)", depends)
    if not m:
        raise RuntimeError(f"{metapackage} depends on {depends!r}, not one kernel package")
    return {"release": m.group(1), "version": m.group(2)}


def _compiler(apt: PrivateApt, kernel: dict[str, str]) -> str:
    """The gcc the headers were made for; it must be L0's (else the module would not match
    the kernel's compiler flags)."""
    depends = apt.field(f"linux-headers-{kernel['release']}", "Depends")
    gccs = re.findall(r"\b(gcc-\d+)\b", depends)
    if not gccs:
        raise RuntimeError(f"linux-headers-{kernel['release']} names no gcc: {depends!r}")
    if shutil.which(gccs[0]) is None:
        raise RuntimeError(
            f"linux-headers-{kernel['release']} wants {gccs[0]}, which L0 has not: "
            "install it, or pin a kernel built with L0's gcc"
        )
    return str(gccs[0])


def _modinfo(ko: Path, field: str) -> str:
    return subprocess.run(
        ["modinfo", "-F", field, str(ko)], check=True, capture_output=True, text=True
    ).stdout.strip()
