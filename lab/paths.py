"""Where the lab keeps things: a cache that survives ``down`` and a run directory that does not."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Images and libvirt's QEMU capability cache (a cold probe costs about 8 s per host)."""
    base = os.environ.get("PTMIG_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ptmig"
    )
    return Path(base)


def run_dir() -> Path:
    """State of the running lab.

    Outside /tmp-like private mounts and outside the paths each host bind-mounts, so both
    hosts see the guest's disk at the same path and live migration needs no storage copy.
    """
    return Path(os.environ.get("PTMIG_LAB_DIR", "/var/tmp/ptmig-lab"))
