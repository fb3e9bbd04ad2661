"""The hybrid path's migratable device in the nested lab: ``mtty`` mediated devices.

L1's 6.12 kernel has the ``mtty`` sample loaded (lab.nested.kernel): an emulated PCI
serial card (vendor 0x4348, device 0x3253) whose driver implements VFIO migration, so
QEMU copies its state (the UART registers) when the VM moves.  Both lab hosts live in one
L1 kernel, so the mdevs they offer come from one parent: each host gets its own UUIDs
(:func:`host_uuids`: one for the guest and a spare), and its ``serial`` pool lists only
those.  In L2 the device is proved by its UART scratch register (offset 7 of BAR0, an I/O
BAR), written and read through ``/dev/port``: nothing but a state copy carries a value
written there onto another mdev.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import libvirt
import libvirt_qemu

#: The mtty parent's mdev types in L1 (samples/vfio-mdev/README.rst).
MTTY_TYPES = "/sys/devices/virtual/mtty/mtty/mdev_supported_types"
#: Two UART ports per device; the pools' mdev type.
MTTY_TYPE = "mtty-2"
#: Where L1 lists every mdev; empty once the lab removed its own.
MDEV_DEVICES = "/sys/bus/mdev/devices"
#: mtty's PCI identity as the guest sees it (mtty.c's config space: 0x32534348).
MTTY_VENDOR = 0x4348
MTTY_DEVICE = 0x3253
#: The 16550's scratch register: offset 7 of the port's I/O range (mtty keeps it as
#: state, uart_reg[UART_SCR], and its migration stream carries it).
UART_SCR = 7
#: A ``resource`` line's flag for an I/O port range (include/linux/ioport.h).
IORESOURCE_IO = 0x100
#: The mdevs each host offers: one for the guest and a spare.
PER_HOST = 2
#: The guest's mdev hostdev alias, QEMU's device id.
MDEV_ALIAS = "ua-serial0"

_NAMESPACE = uuid.UUID("6f1d0c52-5a8e-4c1e-9b0a-7d3e2f4c8a10")


def host_uuids(host: str, count: int = PER_HOST) -> tuple[str, ...]:
    """*host*'s mdev UUIDs: fixed for a name, never another host's."""
    return tuple(str(uuid.uuid5(_NAMESPACE, f"ptmig-lab/{host}/{i}")) for i in range(count))


def create_command(uuids: Iterable[str], mdev_type: str = MTTY_TYPE) -> str:
    """The shell command that makes an mdev of *mdev_type* for each UUID, in L1."""
    create = f"{MTTY_TYPES}/{mdev_type}/create"
    return "set -e; " + "; ".join(f"echo {uuid.UUID(u)} > {create}" for u in uuids)


def remove_command(uuids: Iterable[str] | None = None) -> str:
    """The shell command that removes the mdevs *uuids* (None: every mdev of L1) and
    then lists what is left in :data:`MDEV_DEVICES`."""
    targets = (
        " ".join(f"{MDEV_DEVICES}/{uuid.UUID(u)}" for u in uuids)
        if uuids is not None
        else f"{MDEV_DEVICES}/*"
    )
    return (
        f'for d in {targets}; do [ -e "$d/remove" ] && echo 1 > "$d/remove"; done; '
        f"ls {MDEV_DEVICES}"
    )


#: The guest mdev's vfio-pci properties set through libvirt's ``<qemu:override>`` (name,
#: libvirt type, value).  ``migration-events``: QEMU reports each VFIO migration state change
#: (``VFIO_MIGRATION``), the state copy's own evidence.  The other two are the lab's, not
#: ptmig's: mtty answers the DMA-logging probe (its no-op ``log_ops``), but L1's Debian 6.12
#: is built without ``CONFIG_IOMMUFD_DRIVER``, whose absence makes the kernel answer every
#: DMA-logging report with EOPNOTSUPP, so QEMU's first dirty sync fails ("ram_save_setup
#: failed").  ``x-device-dirty-page-tracking=off`` makes QEMU use the type1 container's
#: dirty tracking instead (mtty pins no pages, so it reports nothing dirty: right for a
#: device that does no DMA); QEMU 10.0 then blocks the migration unless
#: ``enable-migration=on`` (it counts only device and iommufd dirty tracking at realize).
#: docs/lab.md has the sources.
MDEV_QEMU_PROPERTIES = (
    ("migration-events", "bool", "true"),
    ("x-device-dirty-page-tracking", "string", "off"),
    ("enable-migration", "string", "on"),
)


def override_xml(alias: str = MDEV_ALIAS) -> str:
    """The ``<qemu:override>`` that sets :data:`MDEV_QEMU_PROPERTIES` on the vfio-pci
    device *alias* (QEMU's device id)."""
    props = "".join(
        f"<qemu:property name='{name}' type='{kind}' value='{value}'/>"
        for name, kind, value in MDEV_QEMU_PROPERTIES
    )
    return (
        f"<qemu:override><qemu:device alias='{alias}'><qemu:frontend>{props}"
        "</qemu:frontend></qemu:device></qemu:override>"
    )


#: In L2: each mtty device's sysfs name, then the first line (BAR0) of its resource file.
FIND_IN_L2 = (
    "for d in /sys/bus/pci/devices/*; do "
    f'if [ "$(cat $d/vendor)" = {MTTY_VENDOR:#06x} ] && '
    f'[ "$(cat $d/device)" = {MTTY_DEVICE:#06x} ]; then '
    'echo "device ${d##*/}"; head -n 1 "$d/resource"; fi; done'
)


class MttyNotFound(RuntimeError):
    """L2 does not show exactly one mtty device with an I/O BAR0."""


def scratch_port(listing: str) -> int:
    """The I/O port of the scratch register of the one mtty device *listing*
    (:data:`FIND_IN_L2`'s output) names."""
    lines = [line.strip() for line in listing.strip().splitlines() if line.strip()]
    devices = [i for i, line in enumerate(lines) if line.startswith("device ")]
    if len(devices) != 1 or devices[0] + 1 >= len(lines):
        raise MttyNotFound(f"not one mtty device with a resource line in L2: {listing!r}")
    try:
        start, end, flags = (int(f, 16) for f in lines[devices[0] + 1].split())
    except ValueError as exc:
        raise MttyNotFound(f"unreadable resource line: {lines[devices[0] + 1]!r}") from exc
    if not flags & IORESOURCE_IO or start == 0 or end < start + UART_SCR:
        raise MttyNotFound(f"BAR0 is no assigned I/O range of 8 ports: {lines[devices[0] + 1]!r}")
    return start + UART_SCR


def write_port_command(port: int, value: int) -> str:
    """In L2: write byte *value* to I/O *port* through /dev/port."""
    if not 0 <= value <= 0xFF or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port:#x}, value {value}: a byte to a 16-bit port")
    return (
        'python3 -c \'import os; f = os.open("/dev/port", os.O_WRONLY); '
        f"os.pwrite(f, bytes([{value}]), {port})'"
    )


def read_port_command(port: int) -> str:
    """In L2: print the byte at I/O *port*, read through /dev/port."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port:#x}: not a 16-bit port")
    return (
        'python3 -c \'import os; f = os.open("/dev/port", os.O_RDONLY); '
        f"print(os.pread(f, 1, {port})[0])'"
    )


@dataclass(frozen=True)
class VfioMigrationEvent:
    host: str
    device: str
    state: str


class VfioMigrationEvents:
    """QEMU's ``VFIO_MIGRATION`` events on each host, as libvirt relays them (the guest's
    mdev with ``migration-events=on``: :func:`override_xml`).  The connections must have
    been opened after libvirt's event loop started (host.hypervisor.events)."""

    EVENT = "VFIO_MIGRATION"

    def __init__(self, conns: Mapping[str, libvirt.virConnect]) -> None:
        self._lock = threading.Lock()
        self._seen: list[VfioMigrationEvent] = []
        self._ids: list[tuple[libvirt.virConnect, int]] = []
        for host, conn in conns.items():
            cb_id = libvirt_qemu.qemuMonitorEventRegister(
                conn,
                None,  # every domain: the guest arrives later
                self.EVENT,
                self._on_event,
                host,
                0,
            )
            self._ids.append((conn, cb_id))

    def _on_event(
        self,
        _conn: libvirt.virConnect,
        _dom: libvirt.virDomain,
        _event: str,
        _seconds: int,
        _micros: int,
        details: str,
        host: str,
    ) -> None:
        data = json.loads(details) if details else {}
        with self._lock:
            self._seen.append(
                VfioMigrationEvent(host, data.get("device-id", ""), data.get("device-state", ""))
            )

    def states(self, host: str, device: str = MDEV_ALIAS) -> list[str]:
        with self._lock:
            return [e.state for e in self._seen if e.host == host and e.device == device]

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def wait_for(
        self, host: str, state: str, device: str = MDEV_ALIAS, timeout: float = 20
    ) -> list[str]:
        """*device*'s states on *host* once *state* is among them (events arrive on
        libvirt's loop, after the migration call returned)."""
        deadline = time.monotonic() + timeout
        while state not in (seen := self.states(host, device)):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no VFIO_MIGRATION {state} of {device} on {host} in {timeout:.0f} s: {seen}"
                )
            time.sleep(0.2)
        return seen

    def close(self) -> None:
        for conn, cb_id in self._ids:
            with contextlib.suppress(libvirt.libvirtError):  # the connection went with the lab
                libvirt_qemu.qemuMonitorEventDeregister(conn, cb_id)
        self._ids.clear()
