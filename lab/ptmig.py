"""The ``ptmig`` command as the lab runs it: from this checkout, as an operator would type
it, with a journal of the lab's, on the interpreter :data:`HOST_PYTHON_ENV` names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lab.run import CommandError

#: The interpreter ``ptmig`` runs on; e.g. /usr/bin/python3 to drive the lab from the
#: distribution's python3-libvirt, -grpcio and -protobuf instead of the virtualenv's.
HOST_PYTHON_ENV = "PTMIG_LAB_HOST_PYTHON"
REPO = Path(__file__).resolve().parents[1]
#: This checkout and its contract first (a venv's editable install may point at another
#: checkout's protos/).
CHECKOUT_PYTHONPATH = os.pathsep.join([str(REPO), str(REPO / "protos")])


def cli_argv(uri: str, *args: str) -> list[str]:
    """``ptmig -c URI ARGS`` as a command line."""
    return [os.environ.get(HOST_PYTHON_ENV) or sys.executable, "-m", "host.cli", "-c", uri, *args]


def cli_env(journal: str) -> dict[str, str]:
    """The environment ``ptmig`` runs in: this checkout, *journal*."""
    return {**os.environ, "PTMIG_JOURNAL": journal, "PYTHONPATH": CHECKOUT_PYTHONPATH}


def ptmig_at(
    uri: str, journal: str, *args: str, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``ptmig -c URI ARGS`` with *journal*; CommandError if *check* and it fails."""
    argv = cli_argv(uri, *args)
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=cli_env(journal)
    )
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stdout + proc.stderr)
    return proc
