"""Teams: switch to the standby, bind a new primary, create agent-owned bonds.

Pure logic over guest_agent.links.Links; no pyroute2 here.  Every step that
changes the kernel is followed by a check of the resulting state, and every wait
is on link events with the caller's deadline.  Errors are TeamError subclasses
whose `code` names the gRPC status the service answers with.
"""

from __future__ import annotations

import enum
import errno
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import ClassVar, NamedTuple, TypeVar

from guest_agent.addresses import AddressError, parse_mac, parse_pci
from guest_agent.links import (
    BOND_MODE_ACTIVE_BACKUP,
    BondingUnavailable,
    FailOverMac,
    Link,
    LinkError,
    LinkRefused,
    Links,
    NoSuchLink,
    WaitTimeout,
    by_index,
    by_name,
)
from guest_agent.rules import ManagedBy, PrimaryRule

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Before asking the bond again for an active slave it refused: its MII monitor's interval.
ACTIVE_RETRY_S = 0.1
#: How long the old member's frames still reach the bond after a handover (`_handover`):
#: two MII monitor intervals, the bond's gratuitous ARP waits for one when the new member's
#: link has just come up.
HANDOVER_GRACE_S = 0.2
#: The standby's driver: what tells it from a VF that carries the same MAC.
STANDBY_DRIVER = "virtio_net"


class MacPolicy(enum.Enum):
    PRESERVE = "preserve"  # the new device gets the team's MAC before it is enslaved
    FOLLOW = "follow"  # bond fail_over_mac=active; its MAC follows the active member
    NONE = "none"  # never touch MACs (SR-IOV VF: the host programs them)


class Ownership(enum.Enum):
    ADMIN = "admin"  # the guest's network config owns the bond; we only switch members
    AGENT = "agent"  # the agent creates the bond at start-up


class DeviceMatch(NamedTuple):
    """How a device is recognised; every given field must match.

    A MAC names the burned-in address first: under fail_over_mac=none the bond
    rewrites its members' current MACs, and under MAC policy preserve the primary
    carries the team's MAC, which is often the standby's burned-in one.  Only when
    no link has that burned-in MAC does the current address count (a link whose
    driver reports no permanent address).
    """

    name: str | None = None
    mac: str | None = None
    pci_address: str | None = None

    def matches(self, link: Link) -> bool:
        return (
            (self.name is None or link.name == self.name)
            and (self.mac is None or link.has_mac(self.mac))
            and (self.pci_address is None or link.pci_address == self.pci_address)
        )

    def select(self, links: Iterable[Link]) -> list[Link]:
        """The links this match names, by the rule above; bonds never."""
        candidates = [ln for ln in links if self.matches(ln) and ln.kind != "bond"]
        if self.mac is None:
            return candidates
        burned_in = [ln for ln in candidates if ln.permanent_mac == self.mac]
        return burned_in or candidates

    def __str__(self) -> str:
        parts = [
            f"{key} {value}"
            for key, value in (("name", self.name), ("pci", self.pci_address), ("mac", self.mac))
            if value
        ]
        return "device with " + " and ".join(parts)


class TeamConfig(NamedTuple):
    name: str
    bond: str
    standby: DeviceMatch
    mac_policy: MacPolicy = MacPolicy.PRESERVE
    ownership: Ownership = Ownership.ADMIN
    mac: str | None = None  # the team's MAC under PRESERVE; None: the bond's MAC
    primary: DeviceMatch | None = None  # AGENT teams: bound at start-up when present
    num_peer_notif: int = 1  # gratuitous ARPs / unsolicited NAs per switch (AGENT bonds)
    managed_by: ManagedBy = ManagedBy.COORDINATOR  # GUEST: guest_agent.autonomy acts
    primary_rule: PrimaryRule | None = None  # GUEST: which plugged NIC is the primary


class TeamEvent(NamedTuple):
    """What the agent did on its own for a guest-managed team, and why (GetState)."""

    kind: str  # "primary-lost", "primary-bound"
    device: str
    reason: str  # e.g. "enp2s0 removed (hot-unplug or surprise removal)"
    ok: bool
    detail: str  # the outcome: the team's state after it, or the error
    unix_ms: int


class TeamState(NamedTuple):
    name: str
    bond: str
    bond_present: bool
    mac_policy: MacPolicy
    ownership: Ownership
    mac: str | None
    fail_over_mac: FailOverMac | None
    active_member: str | None
    standby: str | None
    members: tuple[str, ...]
    primary: str | None
    managed_by: ManagedBy = ManagedBy.COORDINATOR
    last_event: TeamEvent | None = None


class TeamLayout(NamedTuple):
    """A team's links in one dump: what guest_agent.autonomy compares between events."""

    config: TeamConfig
    bond: Link | None
    standby: Link | None
    members: tuple[Link, ...]  # every link enslaved to the bond, the standby included


class SwitchResult(NamedTuple):
    team: TeamState
    released: tuple[str, ...]


class BindResult(NamedTuple):
    team: TeamState
    device: str


class TeamError(Exception):
    """A refused or failed team operation; `code` is the gRPC status name."""

    code: ClassVar[str] = "INTERNAL"


class UnknownTeam(TeamError):
    code = "NOT_FOUND"


class DeviceNotFound(TeamError):
    code = "NOT_FOUND"


class InvalidRequest(TeamError):
    code = "INVALID_ARGUMENT"


class Conflict(TeamError):
    """The kernel state does not allow the operation (member elsewhere, bond missing)."""

    code = "FAILED_PRECONDITION"


class Timeout(TeamError):
    code = "DEADLINE_EXCEEDED"


class KernelError(TeamError):
    code = "INTERNAL"


class Abandoned(TeamError):
    """The caller went away while the request waited for its team: nothing was done.

    A request queued behind a stopped agent must not run after the host gave up on it and
    moved on (say, a switch to standby landing after the rollback's bind).
    """

    code = "CANCELLED"


def _then_release(after: Callable[[], None], lock: threading.Lock) -> None:
    try:
        after()
    except Exception:  # a thread's exception would only be printed to stderr
        log.exception("finishing a team operation after its answer")
    finally:
        lock.release()


def _caller_waits() -> bool:
    return True


def _describe(links: Sequence[Link], index: int | None) -> str:
    link = by_index(links, index)
    return link.name if link else "none"


def _still_wanted(team: str, caller_waits: Callable[[], bool]) -> None:
    if not caller_waits():
        raise Abandoned(f"team {team}: the caller gave up while the team was busy; nothing done")


def _name_or_empty(links: Sequence[Link], index: int | None) -> str:
    """A link's name for the contract, where "" (not "none") means there is none."""
    link = by_index(links, index)
    return link.name if link else ""


def _index(link: Link | None) -> int | None:
    return link.index if link else None


class Teams:
    """The configured teams and the operations on them.

    One lock per team: a bind and a switch on the same bond would interleave
    their down/enslave/activate steps; different teams do not interfere.
    """

    def __init__(self, links: Links, teams: Sequence[TeamConfig]) -> None:
        self._links = links
        self._teams = {team.name: team for team in teams}
        self._locks = {team.name: threading.Lock() for team in teams}
        self._events: dict[str, TeamEvent] = {}
        self._after: dict[str, Callable[[], None]] = {}  # team -> left to do after answering

    @property
    def names(self) -> list[str]:
        return list(self._teams)

    def list_links(self) -> list[Link]:
        return self._call(self._links.list_links)

    def states(self) -> list[TeamState]:
        links = self.list_links()
        return [self._state(team, links) for team in self._teams.values()]

    def snapshot(self, deadline: float) -> tuple[list[Link], list[TeamState]]:
        """The links and every team's state from one dump, between team operations.

        GetState answers with this.  A team being set up at start-up, or bound or switched
        for a caller, is half-built until its operation ends (a bond without its standby,
        a primary enslaved but not yet active); a host that reads that may act on it.  So
        each team's lock is waited for until *deadline*; a team still busy then (an
        operation waiting on a carrier past the caller's patience) is reported as the dump
        shows it, which `_state` keeps consistent.
        """
        held: list[threading.Lock] = []
        try:
            for name in self._teams:
                lock = self._locks[name]
                if lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    held.append(lock)
                else:
                    log.info("team %s: busy; its state is read mid-operation", name)
            links = self.list_links()
            return links, [self._state(team, links) for team in self._teams.values()]
        finally:
            for lock in held:
                lock.release()

    @contextmanager
    def _holding(self, name: str) -> Iterator[None]:
        """The team's lock for one operation.  What the operation left to do after its
        answer (a bind's handover grace, `_all_members_deliver`) runs on a thread of its
        own that lets the lock go when it is through: the next operation on the team, and
        GetState's snapshot, wait for it."""
        lock = self._locks[name]
        lock.acquire()
        try:
            yield
        finally:
            after = self._after.pop(name, None)
            if after is None:
                lock.release()
            else:
                finish = threading.Thread(
                    target=_then_release, args=(after, lock), name=f"team-{name}-after"
                )
                try:
                    finish.start()
                except RuntimeError:  # no new thread at interpreter shutdown: finish here
                    _then_release(after, lock)

    # -- switch --------------------------------------------------------------

    def use_standby(
        self,
        name: str,
        release_primary: bool,
        deadline: float,
        caller_waits: Callable[[], bool] = _caller_waits,
    ) -> SwitchResult:
        """Make the standby the active member, verified; optionally release the rest."""
        team = self._team(name)
        with self._holding(name):
            _still_wanted(name, caller_waits)
            links = self.list_links()
            bond = self._bond(team, links)
            standby = self._standby(team, links)
            if standby.master != bond.index:
                raise Conflict(
                    f"team {name}: standby {standby.name} is not a member of {bond.name}"
                )
            self._wait(
                lambda ls: self._linked(ls, standby.index),
                deadline,
                f"team {name}: standby {standby.name} has no carrier",
                only=(standby.index,),
            )
            change = bond.bond is None or bond.bond.active_slave != standby.index
            with self._handover(team, bond) if change else nullcontext():
                if change:
                    log.info("team %s: making standby %s active", name, standby.name)
                    self._call(self._links.set_active_slave, bond.index, standby.index)
                (bond_now,) = self._wait(
                    lambda ls: ls if self._active(ls, bond.index) == standby.index else None,
                    deadline,
                    f"team {name}: {bond.name} did not make {standby.name} active",
                    only=(bond.index,),
                )
            released, gone = [], set()
            # The members as the first dump showed them: the team's lock keeps the agent's
            # own operations out meanwhile, and one that has gone since is released already.
            for member in links if release_primary else []:
                if member.master == bond.index and member.index != standby.index:
                    log.info("team %s: releasing %s from %s", name, member.name, bond.name)
                    try:
                        self._call(self._links.release, member.index)
                    except DeviceNotFound:
                        log.info("team %s: %s is gone already", name, member.name)
                        gone.add(member.index)
                        continue
                    released.append(member.name)
            # The team as the switch left it, without another dump (0.2-0.6 s under TCG):
            # the first dump's links with the bond as read after the change, the members
            # released let go and those found gone left out; the bond is read again if a
            # release may have changed it.
            if released:
                bond_now = self._read(bond.index)[0]
            changed = {bond.index: bond_now}
            for member in links:
                if member.name in released:
                    changed[member.index] = member._replace(master=None)
            now = [changed.get(ln.index, ln) for ln in links if ln.index not in gone]
            state = self._state(team, now)
            return SwitchResult(state, tuple(released))

    # -- bind ----------------------------------------------------------------

    def bind_primary(
        self,
        name: str,
        pci_address: str | None,
        mac: str | None,
        policy: MacPolicy | None,
        deadline: float,
        caller_waits: Callable[[], bool] = _caller_waits,
    ) -> BindResult:
        """Find the device, enslave it, wait for its carrier, make it active."""
        team = self._team(name)
        match = self._device_match(pci_address, mac)
        with self._holding(name):
            _still_wanted(name, caller_waits)
            return self._bind(team, match, policy or team.mac_policy, deadline)

    def adopt(self, name: str, index: int, deadline: float) -> BindResult | None:
        """The agent's own bind of a NIC a guest-managed team's rule picked: BindPrimary's
        path under the same team lock, so it never races the host's bind of that NIC.

        None, with nothing changed, when it is done already (the NIC is the active member:
        a coordinator's BindPrimary came first) or the team has another primary with
        carrier (a second NIC is never bound into a team).
        """
        team = self._team(name)
        with self._holding(name):
            links = self.list_links()
            device = by_index(links, index)
            if device is None:
                raise DeviceNotFound(f"team {name}: ifindex {index} went away")
            bond = self._bond(team, links)
            if self._active(links, bond.index) == index:
                log.info("team %s: %s is already its active member", name, device.name)
                return None
            standby = _index(self._standby_or_none(team, links))
            others = [
                ln
                for ln in links
                if ln.master == bond.index and ln.index not in (index, standby) and ln.carrier
            ]
            if others:
                log.warning(
                    "team %s: has primary %s already; leaving %s alone",
                    name,
                    others[0].name,
                    device.name,
                )
                return None
            match = DeviceMatch(
                pci_address=device.pci_address,
                mac=None if device.pci_address else (device.permanent_mac or device.mac),
            )
            return self._bind(team, match, team.mac_policy, deadline)

    def record(self, name: str, event: TeamEvent) -> None:
        """Keep *event* as the team's last one: GetState reports it."""
        self._events[name] = event

    def layouts(self, links: list[Link]) -> list[TeamLayout]:
        """Every team's bond, standby and members as *links* show them."""
        result = []
        for team in self._teams.values():
            bond = by_name(links, team.bond)
            members = tuple(ln for ln in links if bond is not None and ln.master == bond.index)
            result.append(TeamLayout(team, bond, self._standby_or_none(team, links), members))
        return result

    def _device_match(self, pci_address: str | None, mac: str | None) -> DeviceMatch:
        try:
            pci = parse_pci(pci_address) if pci_address else None
            parsed_mac = parse_mac(mac) if mac else None
        except AddressError as exc:
            raise InvalidRequest(str(exc)) from exc
        if pci is None and parsed_mac is None:
            raise InvalidRequest("give the new device's pci_address, mac, or both")
        return DeviceMatch(mac=parsed_mac, pci_address=pci)

    def _bind(
        self, team: TeamConfig, match: DeviceMatch, policy: MacPolicy, deadline: float
    ) -> BindResult:
        # The bond alone first, not a dump: a refusal comes before the wait, and the dump
        # every link costs under TCG (0.4-0.9 s in the bench) stays off the bind's path.
        named = self._call(self._links.get_link_named, team.bond)
        self._check_policy(team, self._bond(team, [named] if named else []), policy)
        device, links = self._wait_for_device(team, match, deadline)
        bond = self._bond(team, links)
        self._check_policy(team, bond, policy)
        assert bond.bond is not None
        self._refuse_foreign(team, device, bond, links)
        team_mac = (team.mac or bond.mac) if policy is MacPolicy.PRESERVE else None
        log.info(
            "team %s: binding %s (%s), MAC policy %s", team.name, device.name, match, policy.value
        )

        if device.master != bond.index:
            if team_mac and device.mac != team_mac:
                self._set_mac_down(device, team_mac)
            self._call(self._links.enslave, device.index, bond.index)
        self._call(self._links.set_up, device.index, True)
        log.info(
            "team %s: %s in %s and up; waiting for its carrier", team.name, device.name, bond.name
        )
        linked = self._wait(
            lambda ls: self._linked(ls, device.index),
            deadline,
            f"team {team.name}: {device.name} is a member of {bond.name} but has no carrier",
            only=(device.index,),
        )
        log.info("team %s: %s has carrier", team.name, device.name)
        if team_mac:
            self._keep_mac(team, linked, team_mac, deadline)

        def active(links: list[Link]) -> tuple[list[Link], Link] | None:
            new, bond_now = by_index(links, device.index), by_index(links, bond.index)
            if new is None:
                raise NoSuchLink(f"ifindex {device.index} went away")
            if self._active(links, bond.index) != device.index:
                return None
            # under follow the bond's MAC must have followed
            if policy is MacPolicy.FOLLOW and (not bond_now or bond_now.mac != new.mac):
                return None
            return links, new

        (bond,) = self._read(bond.index)
        change = self._active([bond], bond.index) != device.index
        with self._handover(team, bond, after_answer=True) if change else nullcontext():
            if change:
                self._make_active(team, bond, device, deadline)
            final, now = self._wait(
                active,
                deadline,
                f"team {team.name}: {bond.name} did not make {device.name} active",
                only=(device.index, bond.index),
            )
        if team_mac:
            self._keep_mac(team, now, team_mac, deadline)
        # The team as the bind left it: its bond and NIC as last read, the other links as
        # the dump that found the NIC showed them (the team's lock kept the agent's own
        # operations out since).  One more dump would cost the answer 0.2-0.6 s under TCG.
        read = {ln.index: ln for ln in final}
        state = self._state(team, [read.get(ln.index, ln) for ln in links])
        log.info("team %s: %s bound and active", team.name, device.name)
        return BindResult(state, device.name)

    @staticmethod
    def _check_policy(team: TeamConfig, bond: Link, policy: MacPolicy) -> None:
        assert bond.bond is not None
        if policy is MacPolicy.FOLLOW and bond.bond.fail_over_mac is not FailOverMac.ACTIVE:
            raise Conflict(
                f"team {team.name}: MAC policy follow needs {bond.name} with fail_over_mac=active, "
                f"it has {bond.bond.fail_over_mac.name.lower()}"
            )

    def _handover(
        self, team: TeamConfig, bond: Link, after_answer: bool = False
    ) -> AbstractContextManager[None]:
        """While the bond's active member changes, let the old one's frames reach it.

        An active-backup bond drops what a backup member receives, and frames are still
        sent to the old member for a while: those in its queues, and those a switch
        forwards there (or a peer addresses to the old MAC) until the bond's gratuitous
        ARP and unsolicited NA, sent from the new member in the same call, have taught it
        the new one.  With all_slaves_active on they reach the bond; it goes off again
        `HANDOVER_GRACE_S` after the change: before a switch releases the old member, after
        a bind's answer (*after_answer*: nothing in the bind waits on it, and the team's
        next operation waits for it, `_holding`).  Under fail_over_mac none the members share
        the bond's MAC; under active (MAC policy follow) each keeps its own, so the old
        member's frames carry its own MAC, which its driver takes as the host's
        (PACKET_HOST) before the bond sees them: delivered all the same (under follow
        the lab's team lost 0-5 in the switch with it, 0-70 without).  Under kernel
        follow (2) the MACs swap and the old member's frames are for a MAC it no longer
        has: no handover.  An operator's own all_slaves_active=1 is left alone.
        """
        info = bond.bond
        if (
            info is None
            or info.all_slaves_active
            or info.fail_over_mac not in (FailOverMac.NONE, FailOverMac.ACTIVE)
        ):
            return nullcontext()
        return self._all_members_deliver(team, bond, after_answer)

    @contextmanager
    def _all_members_deliver(
        self, team: TeamConfig, bond: Link, after_answer: bool
    ) -> Iterator[None]:
        try:
            self._links.set_all_slaves_active(bond.index, True)
        except LinkError as exc:  # only loses the old member's last frames
            log.info("team %s: %s keeps dropping a backup's frames: %s", team.name, bond.name, exc)
            yield
            return
        changed = False
        try:
            yield
            changed = True
        finally:
            if changed and after_answer:
                self._after[team.name] = lambda: self._end_handover(team, bond, HANDOVER_GRACE_S)
            else:
                self._end_handover(team, bond, HANDOVER_GRACE_S if changed else 0.0)

    def _end_handover(self, team: TeamConfig, bond: Link, grace: float) -> None:
        time.sleep(grace)
        try:
            self._links.set_all_slaves_active(bond.index, False)
        except LinkError as exc:
            log.warning(
                "team %s: all_slaves_active of %s is still on: %s", team.name, bond.name, exc
            )

    def _make_active(self, team: TeamConfig, bond: Link, device: Link, deadline: float) -> None:
        """Make *device* the bond's active slave; if the bond refuses it for want of a link
        (EINVAL), wait for its carrier again and retry until *deadline*.

        The bond checks the slave's carrier at the moment it is asked, and a NIC's carrier
        can drop again right after it first came up: the lab's Debian 12 guest logged
        "bond1: (slave enp4s0): Could not set as active slave; either enp4s0 is down or the
        link is down" just after the agent had seen enp4s0's carrier, and the agent-owned
        team stayed on its standby.
        """
        while True:
            try:
                self._call(self._links.set_active_slave, bond.index, device.index)
                return
            except Conflict as exc:
                cause = exc.__cause__
                no_link = isinstance(cause, LinkRefused) and cause.errno == errno.EINVAL
                if not no_link or time.monotonic() >= deadline:
                    raise
            log.info(
                "team %s: %s refused %s as active slave (no link); waiting for its carrier",
                team.name,
                bond.name,
                device.name,
            )
            time.sleep(ACTIVE_RETRY_S)
            self._wait(
                lambda ls: self._linked(ls, device.index),
                deadline,
                f"team {team.name}: {device.name} lost its carrier and it did not come back",
                only=(device.index,),
            )
            if self._active(self._read(bond.index), bond.index) == device.index:
                return

    def _wait_for_device(
        self, team: TeamConfig, match: DeviceMatch, deadline: float
    ) -> tuple[Link, list[Link]]:
        """The one link *match* names, once udev has finished with it, and the dump that
        showed it (the checks before enslaving need every link).  Named by PCI address, it
        is looked for in sysfs on each event and the links are dumped once it is there.
        The link is read once more after the dump: a dump can still show the kernel's
        name (eth0) with udev's database entry already there (the lab's test_agent saw a
        bind answer eth0 for enp2s0 again after netlink's own re-read by name,
        `Links.list_links`, was made the only guard).  Read after that entry was seen, the
        name is udev's.
        """

        seen: list[str] = []  # named once it appears, for the bind's timeline

        def find(links: list[Link]) -> tuple[Link, list[Link]] | None:
            found = match.select(links)
            if len(found) > 1:
                names = ", ".join(ln.name for ln in found)
                raise Conflict(
                    f"team {team.name}: {match} is ambiguous ({names}); give pci_address"
                )
            if found and not found[0].udev_initialized and not seen:
                seen.append(found[0].name)
                log.info("team %s: %s is there; waiting for udev", team.name, found[0].name)
            return (found[0], links) if found and found[0].udev_initialized else None

        pci = match.pci_address
        ready = None if pci is None else (lambda: self._links.pci_netdev_ready(pci))
        try:
            found, links = self._links.wait_for(find, deadline, ready=ready)
        except WaitTimeout:
            present = [ln for ln in self.list_links() if match.matches(ln)]
            if present:
                raise Timeout(
                    f"team {team.name}: {present[0].name} ({match}) appeared but udev has not "
                    "finished with it"
                ) from None
            raise DeviceNotFound(f"team {team.name}: no {match} appeared in time") from None
        except LinkError as exc:
            raise KernelError(f"team {team.name}: {exc}") from exc
        (device,) = self._read(found.index)
        return device, [device if ln.index == device.index else ln for ln in links]

    def _refuse_foreign(
        self, team: TeamConfig, device: Link, bond: Link, links: list[Link]
    ) -> None:
        """Refuse the standby, another team's device, or a link enslaved elsewhere."""
        if _index(self._standby_or_none(team, links)) == device.index:
            raise Conflict(f"team {team.name}: {device.name} is the team's standby")
        for other in self._teams.values():
            if other is team:
                continue
            other_bond = by_name(links, other.bond)
            if (other_bond and device.master == other_bond.index) or _index(
                self._standby_or_none(other, links)
            ) == device.index:
                raise Conflict(f"{device.name} is a member of team {other.name} ({other.bond})")
        if device.master is not None and device.master != bond.index:
            raise Conflict(f"{device.name} is enslaved to {_describe(links, device.master)}")

    def _set_mac_down(self, device: Link, mac: str) -> None:
        """Give a NIC the team's MAC, down: most drivers (e1000e
        among them) refuse a live change with EBUSY.  A freshly probed NIC is down already,
        and one more netlink call costs the bind 0.1-0.15 s in the TCG guest under traffic,
        so it is set down only if it was up when read or came up since (the EBUSY)."""
        if not device.admin_up:
            try:
                self._call(self._links.set_mac, device.index, mac)
                return
            except Conflict as exc:
                cause = exc.__cause__
                if not (isinstance(cause, LinkRefused) and cause.errno == errno.EBUSY):
                    raise
        self._call(self._links.set_up, device.index, False)
        self._call(self._links.set_mac, device.index, mac)

    def _keep_mac(self, team: TeamConfig, link: Link, mac: str, deadline: float) -> None:
        """Re-apply the team's MAC if a driver reset put the burned-in one back; *link*
        as the bind's last wait read it (no read of its own on the bind's path)."""
        if link.mac == mac:
            return
        index = link.index
        log.warning(
            "team %s: %s has MAC %s again; re-applying %s", team.name, link.name, link.mac, mac
        )
        try:
            self._call(self._links.set_mac, index, mac)
        except Conflict:  # some drivers refuse a live change: do it down, then wait again
            self._set_mac_down(link, mac)
            self._call(self._links.set_up, index, True)
            self._wait(
                lambda ls: self._linked(ls, index),
                deadline,
                f"team {team.name}: {link.name} lost carrier re-applying its MAC",
                only=(index,),
            )

    # -- agent-owned bonds ---------------------------------------------------

    def set_up_owned(self, deadline: float) -> list[TeamError]:
        """Create and populate the bonds of AGENT teams; bind a present primary.

        One team's failure does not stop the others; the failures are returned
        (and logged) so the agent keeps serving GetState, which shows the result.
        """
        failures: list[TeamError] = []
        for team in self._teams.values():
            if team.ownership is not Ownership.AGENT:
                continue
            try:
                with self._holding(team.name):
                    self._create(team)
                    primary = team.primary
                    if primary and any(primary.matches(ln) for ln in self.list_links()):
                        self._bind(team, primary, team.mac_policy, deadline)
            except TeamError as exc:
                log.error("team %s: set-up failed: %s", team.name, exc)
                failures.append(exc)
        return failures

    def _create(self, team: TeamConfig) -> None:
        links = self.list_links()
        bond = by_name(links, team.bond)
        if bond is None:
            fail_over_mac = (
                FailOverMac.ACTIVE if team.mac_policy is MacPolicy.FOLLOW else FailOverMac.NONE
            )
            log.info(
                "team %s: creating bond %s (fail_over_mac=%s)",
                team.name,
                team.bond,
                fail_over_mac.name.lower(),
            )
            index = self._call(
                self._links.create_bond, team.bond, fail_over_mac, team.num_peer_notif
            )
            if team.mac and team.mac_policy is MacPolicy.PRESERVE:
                self._call(self._links.set_mac, index, team.mac)
            links = self.list_links()
        bond = self._bond(team, links)
        standby = self._standby(team, links)
        if standby.master != bond.index:
            if standby.master is not None:
                raise Conflict(
                    f"team {team.name}: standby {standby.name} is enslaved to "
                    f"{_describe(links, standby.master)}"
                )
            log.info("team %s: enslaving standby %s", team.name, standby.name)
            self._call(self._links.enslave, standby.index, bond.index)
            self._call(self._links.set_up, standby.index, True)
        self._call(self._links.set_up, bond.index, True)

    # -- helpers -------------------------------------------------------------

    def _team(self, name: str) -> TeamConfig:
        team = self._teams.get(name)
        if team is None:
            known = ", ".join(self._teams) or "none configured"
            raise UnknownTeam(f"unknown team {name!r} (known: {known})")
        return team

    def _bond(self, team: TeamConfig, links: list[Link]) -> Link:
        bond = by_name(links, team.bond)
        if bond is None:
            raise Conflict(f"team {team.name}: bond {team.bond} does not exist")
        if bond.kind != "bond" or bond.bond is None:
            raise Conflict(f"team {team.name}: {team.bond} is not a bond")
        if bond.bond.mode != BOND_MODE_ACTIVE_BACKUP:
            raise Conflict(f"team {team.name}: {team.bond} is not in active-backup mode")
        return bond

    def _standby_or_none(self, team: TeamConfig, links: list[Link]) -> Link | None:
        """The team's standby, None when no link or several links are it.

        Several links can carry the standby's burned-in MAC: an SR-IOV VF whose MAC the
        host set through its PF to the team's, which is the standby's unless the team has
        its own (QEMU failover's arrangement: net_failover pairs the two by that MAC).
        A VF cannot take another MAC, and a fail_over_mac=none bond gives every member its
        own, so that is the only VF a bond of the standby's MAC can hold.  Of such links
        the standby is the paravirtual one, driven by virtio_net.
        """
        found = team.standby.select(links)
        if len(found) > 1:
            found = [ln for ln in found if ln.driver == STANDBY_DRIVER]
        return found[0] if len(found) == 1 else None

    def _standby(self, team: TeamConfig, links: list[Link]) -> Link:
        standby = self._standby_or_none(team, links)
        if standby is None:
            raise Conflict(f"team {team.name}: standby ({team.standby}) not found or ambiguous")
        return standby

    @staticmethod
    def _active(links: list[Link], bond: int) -> int | None:
        link = by_index(links, bond)
        return link.bond.active_slave if link and link.bond else None

    @staticmethod
    def _linked(links: list[Link], index: int) -> Link | None:
        link = by_index(links, index)
        if link is None:
            raise NoSuchLink(f"ifindex {index} went away")
        return link if link.carrier else None

    def _read(self, *indexes: int) -> list[Link]:
        """Just these links (one bind's NIC and bond), without dumping the others."""
        return self._call(self._links.get_links, indexes)

    def _wait(
        self,
        check: Callable[[list[Link]], T | None],
        deadline: float,
        what: str,
        only: Sequence[int] | None = None,
    ) -> T:
        try:
            return self._links.wait_for(check, deadline, only)
        except WaitTimeout:
            raise Timeout(f"{what} (gave up after the deadline)") from None
        except NoSuchLink as exc:
            raise DeviceNotFound(f"{what}: {exc}") from exc
        except LinkError as exc:
            raise KernelError(f"{what}: {exc}") from exc

    @staticmethod
    def _call(func: Callable[..., T], *args: object) -> T:
        try:
            return func(*args)
        except NoSuchLink as exc:
            raise DeviceNotFound(str(exc)) from exc
        except (LinkRefused, BondingUnavailable) as exc:
            raise Conflict(str(exc)) from exc
        except LinkError as exc:
            raise KernelError(str(exc)) from exc

    def _state(self, team: TeamConfig, links: list[Link]) -> TeamState:
        """The team as *links* show it.  The active member is named only if it is one of
        the members: a dump that says otherwise is torn (`links.contradiction`), and the
        contract's "" (no active member) is true of it, a name outside the bond is not."""
        bond = by_name(links, team.bond)
        info = bond.bond if bond else None
        members = [ln for ln in links if bond and ln.master == bond.index]
        standby = self._standby_or_none(team, links)
        primary = next((ln.name for ln in members if ln.index != _index(standby)), None)
        active = info.active_slave if info else None
        return TeamState(
            name=team.name,
            bond=team.bond,
            bond_present=info is not None,
            mac_policy=team.mac_policy,
            ownership=team.ownership,
            mac=bond.mac if bond else None,
            fail_over_mac=info.fail_over_mac if info else None,
            active_member=_name_or_empty(members, active) if active else None,
            standby=standby.name if standby else None,
            members=tuple(ln.name for ln in members),
            primary=primary,
            managed_by=team.managed_by,
            last_event=self._events.get(team.name),
        )


def deadline_in(seconds: float) -> float:
    return time.monotonic() + seconds
