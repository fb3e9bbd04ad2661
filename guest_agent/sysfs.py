"""Small predicates over /sys and /run; each takes its root so tests fake it in tmp."""

from __future__ import annotations

import os
from pathlib import Path

from guest_agent.addresses import is_pci_address


def pci_address(ifname: str, sys_root: str = "/sys") -> str | None:
    """PCI address of the device behind a network interface, or None.

    Rule: resolve /sys/class/net/IF/device and walk up to the nearest directory
    named like a PCI function.  A virtio-net link's `device` is the virtio bus
    device (virtio0) whose parent is the PCI function, so the walk is needed;
    virtual links (bond, veth, lo) have no `device` link at all.
    """
    device = Path(sys_root, "class", "net", ifname, "device")
    try:
        path = Path(os.path.realpath(device, strict=True))
    except OSError:
        return None
    for part in (path, *path.parents):
        if is_pci_address(part.name):
            return part.name
    return None


def udev_initialized(ifindex: int, run_root: str = "/run") -> bool:
    """True once udev has processed the link, or when no udev runs.

    Rule: udev writes /run/udev/data/n<ifindex> after it has renamed the link and
    run its rules (systemd-networkd waits for the same file).  Acting earlier races
    the rename: udev cannot rename a link we already brought up by enslaving it.
    """
    data = Path(run_root, "udev", "data")
    if not data.is_dir():
        return True
    return (data / f"n{ifindex}").exists()
