"""The two Python runtimes the agent must work on: this venv (current PyPI) and
Debian 12's stock python3 with python3-grpcio 1.51 / -protobuf 3.21 / -pyroute2 0.7.2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
DEBIAN_PYTHON = "/usr/bin/python3"


def debian_missing(*modules: str) -> str | None:
    """Why Debian's python3 cannot run the probe, or None if it can."""
    if not Path(DEBIAN_PYTHON).exists():
        return f"{DEBIAN_PYTHON} not found"
    probe = "; ".join(f"import {module}" for module in modules)
    result = subprocess.run([DEBIAN_PYTHON, "-I", "-c", probe], capture_output=True, text=True)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["?"])[-1]
        return (
            f"{DEBIAN_PYTHON} lacks {', '.join(modules)} ({last}); "
            "apt-get install python3-grpcio python3-protobuf python3-pyroute2"
        )
    return None


def runtimes(*modules: str) -> list[object]:
    reason = debian_missing(*modules)
    return [
        pytest.param(sys.executable, id="venv"),
        pytest.param(
            DEBIAN_PYTHON,
            id="debian12",
            marks=pytest.mark.skipif(reason is not None, reason=reason or ""),
        ),
    ]
