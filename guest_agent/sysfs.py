"""Small predicates over /sys and /run; each takes its root so tests fake it in tmp.

os.path only: pathlib (with urllib.parse and ipaddress) would be the agent's only
reason to import them before it serves.
"""

from __future__ import annotations

import os

from guest_agent.addresses import is_pci_address


def pci_facts(ifname: str, sys_root: str = "/sys") -> tuple[str | None, str | None]:
    """The PCI address (0000:02:00.0) and "vendor:device" (8086:10d3) of the function
    behind a network interface; None for each it does not have.

    Rule: the nearest directory named like a PCI function at or above
    /sys/class/net/IF/device (a virtio-net link's `device` is the virtio bus device,
    virtio0, whose parent is the PCI function; virtual links have no `device`), and
    that function's `vendor` and `device` files (0x8086 -> 8086), which a guest-managed
    team's primary rule can name before the device exists.  One look at the link for
    both: every dump reads them for every link, and under TCG each path resolved in
    Python costs milliseconds.
    """
    found = _pci_function(ifname, sys_root)
    if found is None:
        return None, None
    address, function = found
    ids = [_read_hex_id(os.path.join(function, name)) for name in ("vendor", "device")]
    return address, f"{ids[0]}:{ids[1]}" if ids[0] and ids[1] else None


def _read_hex_id(path: str) -> str | None:
    try:
        with open(path) as fh:
            text = fh.read().strip().lower()
    except OSError:
        return None
    return text[2:] if text.startswith("0x") else text or None


def _pci_function(ifname: str, sys_root: str) -> tuple[str, str] | None:
    """The address and sysfs directory of the PCI function behind *ifname*, or None.

    A NIC's `device` link points at its PCI function itself (../../../0000:02:00.0):
    one readlink names it, and the kernel follows the link when the directory is read.
    Only a link pointing elsewhere (virtio0) is resolved in full to walk up from it.
    """
    device = os.path.join(sys_root, "class", "net", ifname, "device")
    try:
        target = os.path.basename(os.readlink(device))
        if is_pci_address(target):
            return target, device
        path = os.path.realpath(device, strict=True)
    except OSError:
        return None
    while True:
        name = os.path.basename(path)
        if is_pci_address(name):
            return name, path
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
            os.readlink(os.path.join(sys_root, "class", "net", ifname, "device", "driver"))
        )
    except OSError:
        return None


def names_ifindex(ifname: str, ifindex: int, sys_root: str = "/sys") -> bool:
    """True if *ifname* is, in sysfs, the link *ifindex* (or there is no sysfs to ask).

    Rule: /sys/class/net/IF/ifindex.  A link's other facts here are read by its name, and
    udev renames a hot-plugged NIC (eth0 -> enp2s0) while a dump is read: facts read under
    a name that still names the link once they are read are that link's.
    """
    net = os.path.join(sys_root, "class", "net")
    found = _ifindex(os.path.join(net, ifname))
    return found == ifindex if found is not None else not os.path.isdir(net)


def _ifindex(netdev_dir: str) -> int | None:
    """The ifindex in a netdev's sysfs directory; None if it is gone or unreadable."""
    try:
        with open(os.path.join(netdev_dir, "ifindex")) as fh:
            return int(fh.read())
    except (OSError, ValueError):
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


def pci_netdev_initialized(address: str, sys_root: str = "/sys", run_root: str = "/run") -> bool:
    """True once the PCI function *address* has a network interface udev has finished with.

    Rule: a NIC's driver registers its netdev under the function
    (/sys/bus/pci/devices/ADDR/net/IF; virtio-net one level down, under virtio<N>/net),
    and `udev_initialized` of its ifindex (/sys/class/net/IF/ifindex) says udev is done.
    A few reads with no netlink dump: a bind waiting for its hot-plugged NIC asks this on
    every event and dumps the links once, when it is true.
    """
    function = os.path.join(sys_root, "bus", "pci", "devices", address)
    try:
        children = os.listdir(function)
    except OSError:
        return False
    parents = [function] + [os.path.join(function, c) for c in children if c.startswith("virtio")]
    for parent in parents:
        try:
            names = os.listdir(os.path.join(parent, "net"))
        except OSError:
            continue
        for name in names:
            ifindex = _ifindex(os.path.join(parent, "net", name))
            # None: gone or renamed under us, and the next event asks again
            if ifindex is not None and udev_initialized(ifindex, run_root):
                return True
    return False
