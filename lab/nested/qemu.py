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
    #: Fixes applied to the unpacked binary (:data:`BINARY_FIXES`), part of the cache key.
    fixes: tuple[str, ...] = ("svm-intr-injected-once",)

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

    @property
    def fixes(self) -> dict[str, str]:
        """Each binary fix of the recipe and what became of it (:func:`apply_fix`)."""
        fixes = self.manifest.get("fixes", {})
        return {str(k): str(v) for k, v in fixes.items()} if isinstance(fixes, dict) else {}

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


@dataclass(frozen=True)
class BinaryFix:
    """A one-instruction fix to a QEMU binary for which no source can be had here.

    *before* is the machine code around the fault, exactly as one build compiled it;
    *after* the same bytes fixed.  It applies only where *before* occurs exactly once, so
    another build (other registers, offsets) is left alone and says so.
    """

    before: bytes
    after: bytes
    why: str


#: The nested lab's L2 hang (docs/lab.md, "The cause"): ``helper_vmrun`` in QEMU's
#: target/i386/tcg/system/svm_helper.c, case ``SVM_EVTINJ_TYPE_INTR``, sets
#: ``cs->exception_index = vector`` and then delivers the vector itself with
#: ``do_interrupt_x86_hardirq``; the index stays set, and the next exit to the CPU loop
#: delivers the vector a second time, inside L2's own handler (upstream still so).  The
#: fix drops that store (``mov %esi,-0x3db0(%rbx)``, 6 bytes, for a 6-byte NOP): the
#: index keeps the -1 it holds while translated code runs, the vector is still passed in
#: %esi, and the other cases, which leave through ``cpu_loop_exit``, are untouched.
#: Bytes of Debian's 1:11.1.3+ds-2~bpo13+1 build (``movzbl %r12b,%esi; mov
#: %r13d,0x3480(%rbx); mov %esi,-0x3db0(%rbx); movl $0,0x3484(%rbx)``).
BINARY_FIXES = {
    "svm-intr-injected-once": BinaryFix(
        before=bytes.fromhex("410fb6f44489ab8034000089b350c2ffffc7838434000000000000"),
        after=bytes.fromhex("410fb6f44489ab80340000660f1f440000c7838434000000000000"),
        why="an interrupt injected by VMRUN is delivered once, not again at the next exit",
    ),
}


def apply_fix(binary: Path, fix: BinaryFix) -> str:
    """Apply *fix* to *binary* in place: "applied", "already applied", or why not (the
    binary is then unchanged)."""
    data = binary.read_bytes()
    if data.count(fix.after) == 1 and fix.before not in data:
        return "already applied"
    found = data.count(fix.before)
    if found != 1:
        return f"not applied: its code occurs {found} times in this build, not once"
    binary.write_bytes(data.replace(fix.before, fix.after))
    return "applied"


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
        binary = root / "usr/bin/qemu-system-x86_64"
        fixes = {name: apply_fix(binary, BINARY_FIXES[name]) for name in recipe.fixes}
        for name, outcome in fixes.items():
            level = logging.INFO if outcome == "applied" else logging.WARNING
            log.log(level, "QEMU %s, fix %s: %s", version, name, outcome)
        manifest = {
            "key": recipe.key(),
            "recipe": asdict(recipe),
            "version": version,
            "fixes": fixes,
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
