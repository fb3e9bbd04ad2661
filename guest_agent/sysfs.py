"""Small predicates over /sys and /run; each takes its root so tests fake it in tmp.

os.path only: pathlib (with urllib.parse and ipaddress) would be the agent's only
reason to import them before it serves.
"""

from __future__ import annotations

import os

from guest_agent.addresses import is_pci_address


def pci_address(ifname: str, sys_root: str = "/sys") -> str | None:
    """PCI address of the device behind a network interface, or None.

    Rule: resolve /sys/class/net/IF/device and walk up to the nearest directory
    named like a PCI function.  A virtio-net link's `device` is the virtio bus
    device (virtio0) whose parent is the PCI function, so the walk is needed;
    virtual links (bond, veth, lo) have no `device` link at all.
    """
    function = _pci_function(ifname, sys_root)
    return os.path.basename(function) if function else None


def pci_id(ifname: str, sys_root: str = "/sys") -> str | None:
    """The PCI function's "vendor:device" (8086:10d3) behind a network interface, or None.

    What a guest-managed team's primary rule can name before the device exists: the
    function's `vendor` and `device` files (0x8086 -> 8086).
    """
    function = _pci_function(ifname, sys_root)
    if function is None:
        return None
    ids = [_read_hex_id(os.path.join(function, name)) for name in ("vendor", "device")]
    return f"{ids[0]}:{ids[1]}" if ids[0] and ids[1] else None


def _read_hex_id(path: str) -> str | None:
    try:
        with open(path) as fh:
            text = fh.read().strip().lower()
    except OSError:
        return None
    return text[2:] if text.startswith("0x") else text or None


def _pci_function(ifname: str, sys_root: str) -> str | None:
    """The resolved sysfs directory of the PCI function behind *ifname*, or None."""
    device = os.path.join(sys_root, "class", "net", ifname, "device")
    try:
        path = os.path.realpath(device, strict=True)
    except OSError:
        return None
    while True:
        name = os.path.basename(path)
        if is_pci_address(name):
            return path
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent


def driver(ifname: str, sys_root: str = "/sys") -> str | None:
    """Name of the kernel driver bound to the device behind a network interface, or None.

    Rule: the basename of /sys/class/net/IF/device/driver.  For virtio-net that is the
    virtio device's driver (virtio_net), for a passthrough NIC its PCI driver (igbvf,
    e1000e); virtual links have no `device`, so no driver.
    """
    try:
        return os.path.basename(
            os.path.realpath(
                os.path.join(sys_root, "class", "net", ifname, "device", "driver"), strict=True
            )
        )
    except OSError:
        return None


def udev_initialized(ifindex: int, run_root: str = "/run") -> bool:
    """True once udev has processed the link, or when no udev runs.

    Rule: udev writes /run/udev/data/n<ifindex> after it has renamed the link and
    run its rules (systemd-networkd waits for the same file).  Acting earlier races
    the rename: udev cannot rename a link we already brought up by enslaving it.
    """
    data = os.path.join(run_root, "udev", "data")
    if not os.path.isdir(data):
        return True
    return os.path.exists(os.path.join(data, f"n{ifindex}"))
