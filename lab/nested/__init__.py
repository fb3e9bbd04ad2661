"""The nested vfio lab: both libvirt hosts inside one L1 VM that has an IOMMU.

L0 (this machine) boots L1 under TCG with ``intel-iommu``, an emulated SR-IOV ``igb`` and a
whole ``e1000e`` per lab host.  Inside L1 the emulated lab's own fabric and hosts
(:mod:`lab.fabric`, :mod:`lab.hosts`) run unchanged, and the migrated guest is an L2 VM whose
teams hold real vfio-pci devices.  Everything of this lab on L0 lives under
:func:`run_dir` and :func:`cache_dir`, so it never clashes with the emulated lab.
"""

from __future__ import annotations

import os
from pathlib import Path

from lab.paths import cache_dir as _lab_cache


def run_dir() -> Path:
    """L1's overlay, console, PID file and logs on L0."""
    return Path(os.environ.get("PTMIG_VLAB_DIR", "/var/tmp/ptmig-vlab"))


def cache_dir() -> Path:
    """The L1 image and the nested lab's own copy of the L2 image."""
    return _lab_cache() / "vfio"


#: Loopback ports on L0 forwarded (QEMU user networking) to each host's libvirtd in L1.
LIBVIRT_PORTS = {"hosta": 16611, "hostb": 16612}
#: Each host's address on the user-network segment, where those forwards arrive.
UPLINK_IPS = {"hosta": "10.0.2.21", "hostb": "10.0.2.22"}
