"""The host package installs into a clean Debian 12 root from Debian's archive alone.

The root is a copy of the lab's cached debootstrap base (bookworm minbase: no libvirt, no
rich, no ptmig); apt there knows only Debian's bookworm archive, so `apt-get install
./ptmig_*.deb` proves the package's dependencies resolve on a stock Debian 12.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.image import base_root

pytestmark = pytest.mark.e2e


def chroot(root: Path, *cmd: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C.UTF-8",
    }
    return subprocess.run(
        ["chroot", str(root), *cmd], capture_output=True, text=True, timeout=timeout, env=env
    )


def installed(root: Path, package: str) -> bool:
    status = chroot(root, "dpkg-query", "-W", "-f=${db:Status-Status}", package)
    return status.stdout == "installed"


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("debian12") / "root"
    subprocess.run(["cp", "-a", "--reflink=auto", str(base_root()), str(root)], check=True)
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_deb_installs_from_the_archive_and_its_commands_run(
    clean_root: Path, host_deb: Path
) -> None:
    root = clean_root
    assert not installed(root, "python3-libvirt")  # a stock root
    shutil.copy(host_deb, root / "tmp" / host_deb.name)
    update = chroot(root, "apt-get", "update", "-q")
    assert update.returncode == 0, update.stdout[-2000:] + update.stderr
    install = chroot(
        root, "apt-get", "install", "-y", "-q", "--no-install-recommends", f"/tmp/{host_deb.name}"
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr
    print(install.stdout.splitlines()[-1])

    for command in (("ptmig", "--help"), ("ptmigd", "--help"), ("ptmig", "migrate", "--help")):
        result = chroot(root, *command)
        assert result.returncode == 0, (command, result.stderr)
        assert result.stdout.startswith(f"usage: {' '.join(command[:-1])}"), result.stdout[:200]
    checked = chroot(root, "ptmigd", "--check-config")
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == "/etc/ptmig/ptmigd.toml: OK"

    # rich is only recommended: without it the package installs and runs.
    assert installed(root, "python3-libvirt") and not installed(root, "python3-rich")
    assert chroot(root, "systemctl", "is-enabled", "ptmigd.service").stdout.strip() == "enabled"
    for page in ("man1/ptmig.1.gz", "man8/ptmigd.8.gz", "man5/ptmigd.toml.5.gz"):
        assert (root / "usr/share/man" / page).is_file(), page
    assert (root / "usr/share/bash-completion/completions/ptmig").is_file()

    removed = chroot(root, "apt-get", "purge", "-y", "-q", "ptmig")
    assert removed.returncode == 0, removed.stderr
    assert not (root / "usr/lib/ptmig").exists()
    assert not (root / "etc/systemd/system/multi-user.target.wants/ptmigd.service").exists()
