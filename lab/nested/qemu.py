"""The nested lab's L0 QEMU: Debian 13's backported QEMU 11.1, unpacked into one directory.

Why not the host's QEMU 10.0.2 (bookworm-backports): its emulated igb types the VF BARs
32-bit, and once L1's kernel places them above 4 GiB they are never decoded, so igbvf in
L1 or L2 waits for a PF reset that never answers ("PF still in reset state").  QEMU 11.1's
igb types them 64-bit prefetchable and igbvf works (docs/lab.md, "Which QEMU runs where").

How, without touching the host: apt resolves the packages against Debian 13 with a private
state directory, source list and an empty dpkg status (so every library comes from Debian 13
too), downloads them, and ``dpkg-deb -x`` unpacks each into one directory.  The binary runs
through that directory's own dynamic loader and libraries; ``-L`` and ``QEMU_MODULE_DIR``
keep it off the host's QEMU 10 firmware and modules.  Cached by :meth:`QemuRecipe.key`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from lab.image import mirror
from lab.nested.debs import PrivateApt, recipe_key, unpack
from lab.paths import cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QemuRecipe:
    """What is unpacked: *packages* from *backports*, their dependencies from *suite*."""

    suite: str = "trixie"
    backports: str = "trixie-backports"
    packages: tuple[str, ...] = (
        "qemu-system-x86",
        "qemu-system-common",
        "qemu-system-data",
        "seabios",
    )
    #: From the release itself (its option ROMs): backports has none newer.
    suite_packages: tuple[str, ...] = ("ipxe-qemu",)
    mirror: str = ""

    def key(self) -> str:
        return recipe_key(self)


@dataclass(frozen=True)
class UnpackedQemu:
    """A QEMU unpacked by :func:`build_qemu`; :meth:`command` starts it."""

    root: Path

    @property
    def manifest(self) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.root / "manifest.json").read_text())
        return data

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    def command(self, binary: str = "qemu-system-x86_64") -> list[str]:
        """argv up to the binary's own arguments (firmware paths included)."""
        r = self.root
        libs = [r / "usr/lib/x86_64-linux-gnu", r / "lib/x86_64-linux-gnu"]
        return [
            str(r / "usr/lib64/ld-linux-x86-64.so.2"),
            "--library-path",
            ":".join(str(p) for p in libs),
            str(r / "usr/bin" / binary),
            "-L",
            str(r / "usr/share/qemu"),
            "-L",
            str(r / "usr/share/seabios"),
        ]

    def env(self) -> dict[str, str]:
        """The environment for :meth:`command`: its own modules, never the host's."""
        return {**os.environ, "QEMU_MODULE_DIR": str(self.root / "usr/lib/x86_64-linux-gnu/qemu")}


def qemu_dir() -> Path:
    return cache_dir() / "vfio" / "qemu"


def build_qemu(recipe: QemuRecipe | None = None) -> UnpackedQemu:
    """The cached unpacked QEMU for *recipe*, downloading and unpacking it when missing."""
    recipe = recipe or QemuRecipe(mirror=mirror())
    target = qemu_dir() / f"qemu-{recipe.key()}"
    if (target / "manifest.json").exists():
        return UnpackedQemu(target)
    qemu_dir().mkdir(parents=True, exist_ok=True)
    for old in qemu_dir().glob("qemu-*"):
        shutil.rmtree(old, ignore_errors=True)
    log.info("unpacking QEMU from Debian %s (%s) for the nested lab", recipe.backports, target)
    with tempfile.TemporaryDirectory(dir=qemu_dir(), prefix="staging-") as tmp:
        staging = Path(tmp)
        debs = _download(recipe, staging / "apt")
        root = staging / "root"
        unpack(debs, root)
        built = UnpackedQemu(root)
        out = subprocess.run(
            [*built.command(), "--version"],
            env=built.env(),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        version = out.splitlines()[0].removeprefix("QEMU emulator version ").strip()
        manifest = {
            "key": recipe.key(),
            "recipe": asdict(recipe),
            "version": version,
            "debs": sorted(d.name for d in debs),
        }
        (root / "manifest.json").write_text(json.dumps(manifest, indent=1))
        root.rename(target)
    log.info("nested lab QEMU: %s", version)
    return UnpackedQemu(target)


def _download(recipe: QemuRecipe, state: Path) -> list[Path]:
    """The .debs of the recipe and everything they depend on, resolved against an empty
    system so no library is taken from the host."""
    apt = PrivateApt(state, recipe.mirror, (recipe.suite, recipe.backports))
    wanted = [f"{p}/{recipe.backports}" for p in recipe.packages] + list(recipe.suite_packages)
    return apt.install_closure(wanted)
