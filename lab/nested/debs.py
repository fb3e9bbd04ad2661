"""Debian packages fetched for the nested lab without touching the host's apt.

apt runs with a private state directory, source list and an empty dpkg status, so it
resolves against the named suites alone (every library from them, none from the host)
and writes nothing outside *state*.  Used for L0's QEMU 11.1 (:mod:`lab.nested.qemu`) and
for the headers and source that ``mtty.ko`` is built from (:mod:`lab.nested.kernel`).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

#: Debian's archive keyring on Debian 12 carries Debian 13's keys too.
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


def recipe_key(recipe: Any) -> str:
    """A cache key for a dataclass recipe: what it asks for, hashed."""
    return hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode()).hexdigest()[:16]


class PrivateApt:
    """apt-get and apt-cache on *suites* of *mirror*, with all their state under *state*."""

    def __init__(self, state: Path, mirror: str, suites: Sequence[str]) -> None:
        self.state = state
        (state / "lists/partial").mkdir(parents=True, exist_ok=True)
        (state / "archives/partial").mkdir(parents=True, exist_ok=True)
        (state / "status").write_text("")
        sources = state / "sources.list"
        sources.write_text(
            "".join(f"deb [signed-by={KEYRING}] {mirror} {suite} main\n" for suite in suites)
        )
        self.options = [
            f"-oDir::State={state}",
            f"-oDir::State::Lists={state / 'lists'}",
            f"-oDir::State::status={state / 'status'}",
            f"-oDir::Etc::SourceList={sources}",
            "-oDir::Etc::SourceParts=/dev/null",
            "-oDir::Etc::Preferences=/dev/null",
            "-oDir::Etc::PreferencesParts=/dev/null",
            f"-oDir::Cache={state}",
            f"-oDir::Cache::Archives={self.archives}",
            "-oAPT::Architecture=amd64",
            "-oAPT::Install-Recommends=false",
            "-oDebug::NoLocking=1",
            "-oAPT::Sandbox::User=root",  # the private archive dir is root's
        ]
        self.env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", *self.options, "-q", "update"], check=True, env=self.env)

    @property
    def archives(self) -> Path:
        return self.state / "archives"

    def install_closure(self, wanted: Sequence[str]) -> list[Path]:
        """The .debs of *wanted* (``pkg`` or ``pkg/suite``) and all they depend on."""
        subprocess.run(
            ["apt-get", *self.options, "-q", "-y", "--download-only", "install", *wanted],
            check=True,
            env=self.env,
        )
        return self._debs()

    def download(self, wanted: Sequence[str]) -> list[Path]:
        """The .debs of exactly *wanted* (``pkg=version``), no dependency."""
        subprocess.run(
            ["apt-get", *self.options, "-q", "download", *wanted],
            check=True,
            env=self.env,
            cwd=self.archives,
        )
        return self._debs()

    def field(self, package: str, name: str) -> str:
        """Field *name* of the candidate version of *package* (apt-cache show)."""
        out = subprocess.run(
            ["apt-cache", *self.options, "show", "--no-all-versions", package],
            check=True,
            env=self.env,
            capture_output=True,
            text=True,
        ).stdout
        for line in out.splitlines():
            if line.startswith(f"{name}:"):
                return line.split(":", 1)[1].strip()
        raise RuntimeError(f"apt has no {name} for {package}")

    def _debs(self) -> list[Path]:
        debs = sorted(self.archives.glob("*.deb"))
        if not debs:
            raise RuntimeError(f"apt downloaded no package into {self.archives}")
        return debs


def unpack(debs: Sequence[Path], root: Path) -> None:
    """``dpkg-deb -x`` each of *debs* into *root* (no maintainer script runs)."""
    root.mkdir(parents=True, exist_ok=True)
    for deb in debs:
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
