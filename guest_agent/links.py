"""The netlink interface the team logic is written against, and its vocabulary.

`Links` is implemented over pyroute2 by guest_agent.netlink and by a fake in the
tests; nothing else in the agent knows how links are read or changed.  Every
operation addresses links by ifindex: names change under our feet (udev renames a
hot-plugged eth0 to enp2s0), indexes do not.

The agent's value classes (here, in guest_agent.teams, rules, config, autonomy and
ptmig.serial_session) are NamedTuples, not dataclasses, because all of them are imported
before the agent listens: a dataclass compiles its generated methods with `exec` at
import (13 classes cost 74 ms of a 1.2 s start in the TCG lab guest), a NamedTuple
compiles one small function.  They are immutable and compared field by field as before;
`_replace` makes a changed copy.  (Being tuples, they also compare equal to a tuple of
the same values; nothing here compares them with anything but their own kind.)
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import NamedTuple, Protocol, TypeVar

T = TypeVar("T")

BOND_MODE_ACTIVE_BACKUP = 1


class FailOverMac(enum.IntEnum):
    """The bond's fail_over_mac option, with the kernel's numbering."""

    NONE = 0  # slaves all carry the bond's MAC
    ACTIVE = 1  # the bond's MAC follows the active slave
    FOLLOW = 2  # the new active slave gets the bond's MAC, the old one its own


class BondInfo(NamedTuple):
    mode: int
    active_slave: int | None  # ifindex
    fail_over_mac: FailOverMac
    miimon: int
    all_slaves_active: bool = False  # backup members' frames go to the bond too


class Link(NamedTuple):
    index: int  # type: ignore[assignment]  # shadows tuple.index(), which is never used
    name: str
    mac: str | None
    permanent_mac: str | None
    carrier: bool
    operstate: str
    admin_up: bool
    master: int | None  # ifindex of the bond/bridge this link is enslaved to
    kind: str | None  # rtnl kind ("bond", "veth"); None for plain NICs
    pci_address: str | None
    udev_initialized: bool  # udev has finished with it (renamed, db written)
    bond: BondInfo | None = None  # set for kind == "bond"
    driver: str | None = None  # the device's kernel driver (virtio_net, igbvf); None if virtual
    pci_id: str | None = None  # the PCI function's "vendor:device" (8086:10d3), sysfs

    def has_mac(self, mac: str) -> bool:
        """True if `mac` is the current or burned-in address."""
        return mac in (self.mac, self.permanent_mac)


def by_index(links: Sequence[Link], index: int | None) -> Link | None:
    return next((link for link in links if link.index == index), None)


def by_name(links: Sequence[Link], name: str) -> Link | None:
    return next((link for link in links if link.name == name), None)


def contradiction(links: Sequence[Link]) -> str | None:
    """What makes *links* impossible as one kernel state, or None if nothing does.

    The kernel never has a bond whose active slave is not enslaved to it, nor a link whose
    master does not exist.  A link dump is not one atomic read, though: it is written in
    batches, and its "interrupted" flag (NLM_F_DUMP_INTR) covers links added or removed,
    not a link joining or leaving a bond.  A dump taken while a bond is being built can
    list its new slave before the enslave and the bond after it has made that slave
    active.  Such a dump has to be read again, not reported.
    """
    for link in links:
        if link.master is not None and by_index(links, link.master) is None:
            return f"{link.name}'s master ifindex {link.master} is not in the dump"
        active = link.bond.active_slave if link.bond else None
        if active is None:
            continue
        slave = by_index(links, active)
        if slave is None:
            return f"{link.name}'s active slave ifindex {active} is not in the dump"
        if slave.master != link.index:
            return f"{link.name}'s active slave {slave.name} is not enslaved to it"
    return None


class LinkError(Exception):
    """A netlink operation failed; `errno` is the kernel's answer (0 if none)."""

    def __init__(self, message: str, errno: int = 0) -> None:
        super().__init__(message)
        self.errno = errno


class NoSuchLink(LinkError):
    """ENODEV: the link went away (hot-unplugged) between lookup and use."""


class LinkRefused(LinkError):
    """EINVAL/ERANGE/EBUSY/EADDRNOTAVAIL: the kernel would not do it in this state.

    e.g. ERANGE from bond_active_slave for an ifindex that is not a slave, EINVAL
    for a slave without link, EBUSY for enslaving a link that is up.
    """


class BondingUnavailable(LinkError):
    """EOPNOTSUPP: the bonding driver is not loaded (or the link is no bond)."""


class NotPermitted(LinkError):
    """EPERM/EACCES: the agent lacks CAP_NET_ADMIN."""


class WaitTimeout(LinkError):
    """The awaited link state did not come before the deadline."""


class Links(Protocol):
    """What the team logic needs from the kernel.  Deadlines are time.monotonic()."""

    def list_links(self) -> list[Link]:
        """Every link, each named as it was when its facts were read: udev renames a
        hot-plugged NIC while a dump is read, and a name from before the rename with the
        facts (udev's database entry) from after it would be wrong."""
        ...

    def get_links(self, indexes: Sequence[int]) -> list[Link]:
        """Only these links, each read on its own; NoSuchLink if one is gone.

        For the waits of one bind or switch: a whole dump parses every link and reads
        sysfs for each, 40-200 ms under TCG, where one link costs a few milliseconds.
        """
        ...

    def get_link_named(self, name: str) -> Link | None:
        """The link called *name* now, read on its own; None if there is none."""
        ...

    def pci_netdev_ready(self, address: str) -> bool:
        """Whether the PCI function *address* has a netdev udev has finished with, from a
        few reads and no dump (`sysfs.pci_netdev_initialized`): what a bind waiting for its
        hot-plugged NIC asks on each event before it reads the links."""
        ...

    def create_bond(self, name: str, fail_over_mac: FailOverMac, num_peer_notif: int) -> int:
        """Create an active-backup bond (miimon 100), down; return its ifindex."""
        ...

    def enslave(self, index: int, bond: int) -> None:
        """Take the link down (the kernel wants that) and make it a slave of `bond`."""
        ...

    def release(self, index: int) -> None: ...

    def set_active_slave(self, bond: int, index: int) -> None: ...

    def set_all_slaves_active(self, bond: int, on: bool) -> None:
        """The bond's all_slaves_active: whether frames a backup member receives are
        delivered to the bond (1) or dropped (0, the default)."""
        ...

    def set_mac(self, index: int, mac: str) -> None: ...

    def set_up(self, index: int, up: bool) -> None: ...

    def wait_for(
        self,
        check: Callable[[list[Link]], T | None],
        deadline: float,
        only: Sequence[int] | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> T:
        """Return the first non-None `check(links)`, re-checked on each link event.

        With *only*, `check` sees just those links (`get_links`), and only their events
        wake it: a bind waiting on its NIC's carrier need not re-read the guest's other
        links whenever they change.  With *ready*, a cheap predicate that must hold before
        `check` can, the links are read only once it does: a hot-plug's probe sends dozens
        of events, and a dump of every link costs 40-900 ms under TCG.  Raises WaitTimeout
        at the deadline.  Subscribes before the first check, so an event between the check
        and the wait is not lost.
        """
        ...
