"""An in-memory guest_agent.links.Links with the kernel behaviours teams rely on.

Modelled: bond active-backup with miimon failover (active member loses carrier
-> another member with carrier becomes active), fail_over_mac none/active MAC
handling, the bond refusing an active slave without link (EINVAL) or that is no
member (ERANGE), enslaving takes a link down and (optionally) its carrier for a
while like e1000e, a driver reset that puts the burned-in MAC back, hot-plug.
Every state-changing call is recorded in `calls`; waits wake on each change.
"""

from __future__ import annotations

import errno
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from guest_agent.links import (
    BOND_MODE_ACTIVE_BACKUP,
    BondInfo,
    BondingUnavailable,
    FailOverMac,
    Link,
    LinkRefused,
    NoSuchLink,
    WaitTimeout,
    by_name,
)

T = TypeVar("T")


class FakeLinks:
    def __init__(self) -> None:
        self.cond = threading.Condition(threading.RLock())
        self.links: dict[int, Link] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.carrier_delay: dict[
            int, float
        ] = {}  # ifindex -> seconds without carrier after enslave
        self.mac_reset_on_up: set[int] = set()  # next bring-up resets to the burned-in MAC
        self.refuse_live_mac: set[int] = set()  # EBUSY for a MAC change while up
        self.phys: dict[int, bool] = {}  # ifindex -> cable/peer has link (carrier when up)
        self.waits = 0
        self.reads: list[tuple[int, ...]] = []  # get_links calls: the links read alone
        self.dumps = 0  # list_links calls
        self._next = 1
        self._timers: list[threading.Timer] = []
        self.add("lo", mac=None, kind=None)

    # -- building the scene ----------------------------------------------------

    def add(
        self,
        name: str,
        mac: str | None = None,
        pci: str | None = None,
        carrier: bool = True,
        kind: str | None = None,
        permanent_mac: str | None = None,
        udev_initialized: bool = True,
        master: int | None = None,
        up: bool = True,
        pci_id: str | None = None,
        driver: str | None = None,
    ) -> Link:
        with self.cond:
            link = Link(
                index=self._next,
                name=name,
                mac=mac,
                permanent_mac=permanent_mac if permanent_mac is not None else mac,
                carrier=carrier and up,
                operstate="UP" if carrier and up else "DOWN",
                admin_up=up,
                master=master,
                kind=kind,
                pci_address=pci,
                udev_initialized=udev_initialized,
                pci_id=pci_id,
                driver=driver,
            )
            self._next += 1
            self.phys[link.index] = carrier
            self.links[link.index] = link
            self.cond.notify_all()
            return link

    def add_bond(self, name: str, mac: str, fail_over_mac: FailOverMac = FailOverMac.NONE) -> Link:
        link = self.add(name, mac=mac, kind="bond", permanent_mac="")
        bond = BondInfo(BOND_MODE_ACTIVE_BACKUP, None, fail_over_mac, 100)
        return self._put(link._replace(bond=bond, permanent_mac=None))

    def team(self, name: str, members: list[Link], active: Link | None) -> None:
        """Enslave `members` to bond `name` directly, as the guest's config would."""
        bond = self.get(name)
        for member in members:
            self._put(self.get(member.name)._replace(master=bond.index))
            if bond.bond and bond.bond.fail_over_mac is FailOverMac.NONE:
                self._put(self.get(member.name)._replace(mac=bond.mac))
        self._set_active(bond.index, active.index if active else None)

    def later(self, delay: float, func: Callable[[], object]) -> None:
        timer = threading.Timer(delay, func)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    def hotplug_later(self, delay: float, name: str, **kwargs: Any) -> None:
        self.later(delay, lambda: self.add(name, **kwargs))

    def set_carrier(self, name: str, carrier: bool) -> None:
        """The physical side: cable plugged, or the peer up."""
        with self.cond:
            link = self.get(name)
            self.phys[link.index] = carrier
            self._carrier(link.index, carrier and link.admin_up)

    def _carrier(self, index: int, carrier: bool) -> None:
        link = self.links.get(index)
        if link is None or link.carrier == carrier:
            return
        self._put(link._replace(carrier=carrier, operstate="UP" if carrier else "DOWN"))
        self._miimon(link.master)

    def _bring_up(self, index: int) -> None:
        """Carrier returns after carrier_delay (autonegotiation) if the cable is in."""
        link = self.links[index]
        if index in self.mac_reset_on_up and link.mac != link.permanent_mac:
            self.mac_reset_on_up.discard(index)  # one reset, e.g. the one enslaving causes
            self._put(link._replace(mac=link.permanent_mac))
        delay = self.carrier_delay.get(index, 0.0)
        if not self.phys.get(index):
            return
        if not delay:
            self._carrier(index, True)
            return

        def up() -> None:
            with self.cond:
                link = self.links.get(index)
                if link is not None and link.admin_up and self.phys.get(index):
                    self._carrier(index, True)

        self.later(delay, up)

    def update(self, which: str, **changes: Any) -> None:
        with self.cond:
            self._put(self.get(which)._replace(**changes))

    def remove(self, name: str) -> None:
        with self.cond:
            link = self.get(name)
            del self.links[link.index]
            self._miimon(link.master)
            self.cond.notify_all()

    def get(self, name: str) -> Link:
        with self.cond:
            return next(link for link in self.links.values() if link.name == name)

    def close(self) -> None:
        for timer in self._timers:
            timer.cancel()

    def await_(self, reached: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
        """Block until `reached()` holds, checked again at every change of a link and every
        wait begun on the links: how a test meets the agent's thread at a point (a wait
        started, a call that changed a link) instead of sleeping."""
        with self.cond:
            assert self.cond.wait_for(reached, timeout), f"{what}: not within {timeout} s"

    def waiting(self, since: int, what: str, timeout: float = 10.0) -> None:
        """Block until a wait on the links began after `since` (a value of :attr:`waits`)."""
        self.await_(lambda: self.waits > since, what, timeout)

    def changes(self) -> list[tuple[Any, ...]]:
        return list(self.calls)

    # -- the Links protocol ----------------------------------------------------

    def list_links(self) -> list[Link]:
        with self.cond:
            self.dumps += 1
            return sorted(self.links.values(), key=lambda link: link.index)

    def create_bond(self, name: str, fail_over_mac: FailOverMac, num_peer_notif: int) -> int:
        self.calls.append(("create_bond", name, fail_over_mac, num_peer_notif))
        with self.cond:
            if any(link.name == name for link in self.links.values()):
                raise LinkRefused(f"create bond {name}: exists", errno.EEXIST)
            bond = self.add_bond(name, mac="02:00:00:00:0b:0d", fail_over_mac=fail_over_mac)
            self._put(bond._replace(admin_up=False, carrier=False))
            return bond.index

    def enslave(self, index: int, bond: int) -> None:
        self.calls.append(("enslave", self._name(index), self._name(bond)))
        with self.cond:
            link, master = self._link(index), self._bond(bond)
            if link.master is not None:
                raise LinkRefused("already a slave", errno.EBUSY)
            assert master.bond is not None
            mac = master.mac if master.bond.fail_over_mac is FailOverMac.NONE else link.mac
            # Links.enslave takes the link down first; the bond then opens its new slave.
            self._put(link._replace(master=bond, mac=mac, admin_up=True, carrier=False))
            self._bring_up(index)
            self._miimon(bond)

    def release(self, index: int) -> None:
        self.calls.append(("release", self._name(index)))
        with self.cond:
            link = self._link(index)
            bond = link.master
            self._put(link._replace(master=None, mac=link.permanent_mac))
            master = self.links.get(bond) if bond else None
            if master and master.bond and master.bond.active_slave == index:
                self._set_active(master.index, None)
            self._miimon(bond)

    def set_active_slave(self, bond: int, index: int) -> None:
        self.calls.append(("set_active_slave", self._name(bond), self._name(index)))
        with self.cond:
            self._bond(bond)
            link = self.links.get(index)
            if link is None or link.master != bond:
                raise LinkRefused("bond_active_slave: not a slave", errno.ERANGE)
            if not link.carrier:
                raise LinkRefused("bond_active_slave: slave has no link", errno.EINVAL)
            self._set_active(bond, index)

    def set_all_slaves_active(self, bond: int, on: bool) -> None:
        self.calls.append(("set_all_slaves_active", self._name(bond), on))
        with self.cond:
            master = self._bond(bond)
            assert master.bond is not None
            self._put(master._replace(bond=master.bond._replace(all_slaves_active=on)))

    def set_mac(self, index: int, mac: str) -> None:
        self.calls.append(("set_mac", self._name(index), mac))
        with self.cond:
            link = self._link(index)
            if index in self.refuse_live_mac and link.admin_up:
                raise LinkRefused("device busy", errno.EBUSY)
            self._put(link._replace(mac=mac))
            if link.master is not None:
                self._follow(link.master)

    def set_up(self, index: int, up: bool) -> None:
        self.calls.append(("set_up", self._name(index), up))
        with self.cond:
            link = self._link(index)
            if link.admin_up == up:
                return
            self._put(link._replace(admin_up=up))
            if up:
                self._bring_up(index)
            else:
                self._carrier(index, False)

    def get_links(self, indexes: Sequence[int]) -> list[Link]:
        with self.cond:
            self.reads.append(tuple(indexes))
            return [self._link(index) for index in indexes]

    def get_link_named(self, name: str) -> Link | None:
        with self.cond:
            link = by_name(list(self.links.values()), name)
            if link is not None:
                self.reads.append((link.index,))
            return link

    def pci_netdev_ready(self, address: str) -> bool:
        with self.cond:
            return any(
                ln.pci_address == address and ln.udev_initialized for ln in self.links.values()
            )

    def wait_for(
        self,
        check: Callable[[list[Link]], T | None],
        deadline: float,
        only: Sequence[int] | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> T:
        with self.cond:
            self.waits += 1
            self.cond.notify_all()  # for await_: a thread now waits on the links
            while True:
                if ready is None or ready():
                    result = check(self.list_links() if only is None else self.get_links(only))
                    if result is not None:
                        return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise WaitTimeout("deadline")
                self.cond.wait(remaining)

    # -- kernel behaviour ------------------------------------------------------

    def _put(self, link: Link) -> Link:
        with self.cond:
            self.links[link.index] = link
            self.cond.notify_all()
            return link

    def _name(self, index: int) -> str:
        link = self.links.get(index)
        return link.name if link else f"#{index}"

    def _link(self, index: int) -> Link:
        link = self.links.get(index)
        if link is None:
            raise NoSuchLink(f"ifindex {index}: no such device", errno.ENODEV)
        return link

    def _bond(self, index: int) -> Link:
        link = self._link(index)
        if link.bond is None:
            raise BondingUnavailable(f"{link.name} is no bond", errno.EOPNOTSUPP)
        return link

    def _set_active(self, bond: int, index: int | None) -> None:
        master = self.links[bond]
        assert master.bond is not None
        self._put(master._replace(bond=master.bond._replace(active_slave=index)))
        self._follow(bond)

    def _follow(self, bond: int) -> None:
        """fail_over_mac=active: the bond's MAC is the active slave's."""
        master = self.links[bond]
        if master.bond and master.bond.fail_over_mac is FailOverMac.ACTIVE:
            active = self.links.get(master.bond.active_slave or -1)
            if active is not None:
                self._put(master._replace(mac=active.mac))

    def _miimon(self, bond: int | None) -> None:
        """Fail over when the active member loses carrier or leaves; adopt a first member."""
        master = self.links.get(bond) if bond else None
        if master is None or master.bond is None:
            return
        active = self.links.get(master.bond.active_slave or -1)
        if active is not None and active.carrier and active.master == master.index:
            return
        members = [
            ln
            for ln in sorted(self.links.values(), key=lambda link: link.index)
            if ln.master == master.index and ln.carrier
        ]
        self._set_active(master.index, members[0].index if members else None)
