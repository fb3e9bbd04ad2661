"""guest_agent.links.Links over pyroute2 -- the only module that imports pyroute2.

pyroute2 is imported lazily (`_pyroute2()`), and only its IPRoute: the agent answers
as soon as its socket listens, and `warm_up` (a background thread from then on) pays
the import and the first dump before the first call needs them.  `import pyroute2`
itself would load all of pyroute2 -- 0.7.2 (Debian 12) every entry point (NDB, IPDB,
IPSet, WireGuard...), 0.9 the same list by hand -- 416 modules and 26 MB resident on
Debian 12 where IPRoute needs 266 and 16 MB; so the package's ``__init__`` is skipped
(see `_import_iproute`).  Works on pyroute2 0.7.2 and 0.9.x (PyPI); only API common to
both is used.

Socket lifetime: one `IPRoute` per operation, as os-vif does.  A long-lived
socket would be shared by the gRPC worker threads (pyroute2 sockets are not
documented as thread-safe; 0.9 runs an asyncio loop per socket), would queue
multicast messages nobody reads, and would need recovery after ENOBUFS.  A
per-operation socket costs a socket() and a bind(), which is nothing next to the
bond's own timings (seconds).

Events: `wait_for` subscribes a plain NETLINK_ROUTE socket to RTMGRP_LINK (plus
udev's monitor group and an inotify watch on udev's database directory, for "udev
has finished with the link") and treats each message only as a wake-up to re-read
the links.  udev writes a link's database entry (what `sysfs.udev_initialized`
looks for) as soon as its rules have run, but tells its monitor only after the
rules' RUN programs have ended: in the lab's guest 1.5-3 s later under load, which
a bind waited for (docs/benchmarks/README.md, issue 25); inotify wakes it at the
write.  IPRoute.bind()/get() is not used
for this: get() has no timeout on either version, and both versions may already
hold unread events in their own buffers (0.7 "backlog", 0.9 asyncio queue), so a
select() on the IPRoute fd can sleep past an event.  Re-reading the links after
each wake-up also makes an ENOBUFS overrun harmless.  A wait on given links (`only`:
the NIC being bound and its bond) reads just those and wakes only for events naming
them (`link_indexes`): a full dump costs 40-200 ms under TCG, and the guest's other
links change all the time while a device is plugged and another team binds.

Errno meanings (NetlinkError.code), translated in `_translate`:
  ENODEV        the ifindex does not exist (link hot-unplugged)         -> NoSuchLink
  ERANGE        bond_active_slave: ifindex is not a slave of this bond  -> LinkRefused
  EINVAL        bond_active_slave: slave has no link; enslave: bad
                master or mode; bond option out of range                -> LinkRefused
  EBUSY         enslave of a link that is up / already a slave          -> LinkRefused
  EADDRNOTAVAIL MAC refused (multicast, zero)                           -> LinkRefused
  EEXIST        a link of that name exists                              -> LinkRefused
  EOPNOTSUPP    kind "bond" unknown (bonding module not loaded), or a
                bond option sent to a link that is no bond              -> BondingUnavailable
  EPERM/EACCES  no CAP_NET_ADMIN                                        -> NotPermitted
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import select
import socket
import struct
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from guest_agent import sysfs
from guest_agent.links import (
    BOND_MODE_ACTIVE_BACKUP,
    BondInfo,
    BondingUnavailable,
    FailOverMac,
    Link,
    LinkError,
    LinkRefused,
    NoSuchLink,
    NotPermitted,
    WaitTimeout,
    contradiction,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

IFF_UP = 0x1
RTMGRP_LINK = 0x1
NETLINK_KOBJECT_UEVENT = 15
UDEV_MONITOR_GROUP = 2  # events udev re-broadcasts after processing them
IN_MOVED_TO = 0x80  # udev writes a database entry to a temporary file, then renames it
IN_CREATE = 0x100
BOND_MIIMON_MS = 100
RTM_NEWLINK = 16
RTM_DELLINK = 17
NLMSG_HDR = struct.Struct("=IHHII")
IFI_INDEX = struct.Struct("=i")
IFI_INDEX_OFFSET = 4  # ifinfomsg: family u8, pad u8, type u16, index s32, ...

_ERRNO_CLASSES: dict[int, type[LinkError]] = {
    errno.ENODEV: NoSuchLink,
    errno.ERANGE: LinkRefused,
    errno.EINVAL: LinkRefused,
    errno.EBUSY: LinkRefused,
    errno.EADDRNOTAVAIL: LinkRefused,
    errno.EEXIST: LinkRefused,
    errno.EOPNOTSUPP: BondingUnavailable,
    errno.EPERM: NotPermitted,
    errno.EACCES: NotPermitted,
}


_IMPORT_LOCK = threading.Lock()
_imported: tuple[Any, type[Exception]] | None = None


def _pyroute2() -> tuple[Any, type[Exception]]:
    """pyroute2's IPRoute and NetlinkError, imported on first use (by one thread)."""
    global _imported
    with _IMPORT_LOCK:
        if _imported is None:
            _imported = _import_iproute()
        return _imported


def _import_iproute() -> tuple[Any, type[Exception]]:
    """Import ``pyroute2.iproute.linux`` without running ``pyroute2/__init__.py``.

    Python runs a package's ``__init__`` before any of its submodules, and pyroute2's
    imports everything pyroute2 has.  So while the two submodules are imported, the
    package is an empty module with pyroute2's search path; afterwards it is taken out
    of sys.modules again, so that an ``import pyroute2`` elsewhere in the process still
    gets the real package (which then finds these submodules already loaded).  A
    pyroute2 imported before is used as it is.
    """
    if "pyroute2" in sys.modules:
        from pyroute2.iproute.linux import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        return IPRoute, NetlinkError
    spec = importlib.util.find_spec("pyroute2")
    if spec is None:
        raise ImportError("No module named 'pyroute2'", name="pyroute2")
    shell = importlib.util.module_from_spec(spec)  # __path__ set, __init__ not run
    sys.modules["pyroute2"] = shell
    lab = _lab_stand_in()
    try:
        from pyroute2.iproute.linux import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError
    finally:
        if sys.modules.get("pyroute2") is shell:
            del sys.modules["pyroute2"]
        if lab is not None and sys.modules.get(lab.__name__) is lab:
            del sys.modules[lab.__name__]
    return IPRoute, NetlinkError


def _lab_stand_in() -> types.ModuleType | None:
    """pyroute2 0.7's ``pyroute2.lab``, without its ``unittest.mock``, while IPRoute imports.

    0.7.2 (Debian 12) makes IPRoute a subclass of ``pyroute2.lab.LAB_API``, whose only
    job is its documentation's mock mode (``pyroute2.lab.use_mock``, off unless set);
    the module imports ``unittest.mock`` for it: 27 ms natively and 0.7 MiB of the
    agent's resident memory (docs/benchmarks/agent.md).  The stand-in is the class with
    mock mode off, and is taken out of sys.modules again like the package shell above.
    None when there is no such module (pyroute2 0.9) or it is imported already.
    """
    name = "pyroute2.lab"
    if name in sys.modules or importlib.util.find_spec(name) is None:
        return None
    lab = types.ModuleType(name, "stand-in for pyroute2.lab: LAB_API with mock mode off")

    class LAB_API:
        pass

    lab.LAB_API = LAB_API  # type: ignore[attr-defined]
    sys.modules[name] = lab
    return lab


def warm_up(links: NetlinkLinks | None = None) -> None:
    """Import pyroute2 and dump the links once, off the first call's path.

    Started in a background thread once the agent's socket listens: a GetState that
    comes first waits for this import (the lock above) instead of paying it again, and
    the dump leaves pyroute2's message classes and sysfs's directories warm.  A failure
    here is only logged: the first call then meets it and answers with it.
    """
    started = time.monotonic()
    try:
        _pyroute2()
        (links or NetlinkLinks()).list_links()
    except Exception as exc:  # the call that needs netlink meets it again and answers it
        log.warning("netlink warm-up failed (%s: %s)", type(exc).__name__, exc)
        return
    log.debug("netlink warm-up done in %.2f s", time.monotonic() - started)


#: How often a dump raced by link changes is redone before the error is reported.
DUMP_RETRIES = 5
#: The pause before the n-th new dump is n times this: a bond being built changes again
#: within milliseconds.
TORN_DUMP_PAUSE_S = 0.01
RENAME_REREADS = 3  # a link renamed again while read again is returned as last read


def _dump_interrupted(exc: LinkError) -> bool:
    """pyroute2 reports NLM_F_DUMP_INTR as NetlinkError code -1, "dump interrupted"."""
    return exc.errno == -1 and "dump interrupted" in str(exc)


def _translate(exc: Exception, what: str) -> LinkError:
    code = int(getattr(exc, "code", 0) or 0)
    cls = _ERRNO_CLASSES.get(code, LinkError)
    reason = errno.errorcode.get(code, str(code))
    return cls(f"{what}: {exc.args[-1] if exc.args else exc} ({reason})", code)


def _mac(value: object) -> str | None:
    if not isinstance(value, str) or not value or value == "00:00:00:00:00:00":
        return None
    return value.lower()


class NetlinkLinks:
    """Links over rtnetlink; sysfs/run roots are parameters for tests."""

    def __init__(self, sys_root: str = "/sys", run_root: str = "/run") -> None:
        self._sys_root = sys_root
        self._run_root = run_root

    @contextmanager
    def _ipr(self, what: str) -> Iterator[Any]:
        iproute, netlink_error = _pyroute2()
        try:
            with iproute() as ipr:
                yield ipr
        except netlink_error as exc:
            raise _translate(exc, what) from exc

    def list_links(self) -> list[Link]:
        """All links, as one state of the kernel.

        A dump that races a link being added or removed is flagged NLM_F_DUMP_INTR by the
        kernel (pyroute2: "dump interrupted", code -1); one that races a link joining or
        leaving a bond is not flagged, but contradicts itself (`links.contradiction`; on
        Debian 13 a GetState at start-up named an active member outside the bond).  Either
        is dumped again, a little later each time; a dump still contradictory after
        DUMP_RETRIES is returned as it is (the team logic never names an active member
        outside its bond).
        """
        links: list[Link] = []
        for attempt in range(DUMP_RETRIES):
            if attempt:
                time.sleep(TORN_DUMP_PAUSE_S * attempt)
            try:
                with self._ipr("list links") as ipr:
                    links = [self._link(msg, ipr) for msg in ipr.get_links()]
            except LinkError as exc:
                if not _dump_interrupted(exc) or attempt == DUMP_RETRIES - 1:
                    raise
                log.debug("link dump interrupted by a change; dumping again")
                continue
            torn = contradiction(links)
            if torn is None:
                return links
            log.debug("link dump contradicts itself (%s); dumping again", torn)
        log.warning("link dumps kept contradicting themselves; using the last one")
        return links

    def get_links(self, indexes: Sequence[int]) -> list[Link]:
        with self._ipr(f"read ifindex {', '.join(map(str, indexes))}") as ipr:
            return [
                self._link(msg, ipr) for index in indexes for msg in ipr.link("get", index=index)
            ]

    def get_link_named(self, name: str) -> Link | None:
        try:
            with self._ipr(f"read link {name}") as ipr:
                return next((self._link(msg, ipr) for msg in ipr.link("get", ifname=name)), None)
        except NoSuchLink:
            return None

    def pci_netdev_ready(self, address: str) -> bool:
        return sysfs.pci_netdev_initialized(address, self._sys_root, self._run_root)

    def _link(self, msg: Any, ipr: Any) -> Link:
        """The link *msg* describes, its sysfs facts read under the name it has now.

        Those facts are read by name after the message was written, and udev renames a
        hot-plugged NIC in between (a dump says eth0, the reads come after the rename to
        enp2s0 and find its PCI address but not its driver: the lab's watcher then judged
        the NIC wanted by no team).  A link whose name no longer names it once its facts
        are read is read again, by ifindex, under its new name.
        """
        link = self._parse(msg)
        for _ in range(RENAME_REREADS):
            if sysfs.names_ifindex(link.name, link.index, self._sys_root):
                return link
            _, netlink_error = _pyroute2()
            try:
                fresh = list(ipr.link("get", index=link.index))
            except netlink_error:  # gone meanwhile: the event that says so wakes a wait
                return link
            if not fresh:
                return link
            log.debug("ifindex %d renamed from %s while read; read again", link.index, link.name)
            link = self._parse(fresh[0])
        return link

    def _parse(self, msg: Any) -> Link:
        name = msg.get_attr("IFLA_IFNAME")
        linkinfo = msg.get_attr("IFLA_LINKINFO")
        kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo is not None else None
        bond = None
        if kind == "bond" and linkinfo is not None:
            data = linkinfo.get_attr("IFLA_INFO_DATA")
            if data is not None:
                active = data.get_attr("IFLA_BOND_ACTIVE_SLAVE")
                bond = BondInfo(
                    mode=int(data.get_attr("IFLA_BOND_MODE") or 0),
                    active_slave=int(active) if active else None,
                    fail_over_mac=FailOverMac(int(data.get_attr("IFLA_BOND_FAIL_OVER_MAC") or 0)),
                    miimon=int(data.get_attr("IFLA_BOND_MIIMON") or 0),
                    all_slaves_active=bool(data.get_attr("IFLA_BOND_ALL_SLAVES_ACTIVE")),
                )
        master = msg.get_attr("IFLA_MASTER")
        pci_address, pci_id = sysfs.pci_facts(name, self._sys_root)
        return Link(
            index=int(msg["index"]),
            name=name,
            mac=_mac(msg.get_attr("IFLA_ADDRESS")),
            permanent_mac=_mac(msg.get_attr("IFLA_PERM_ADDRESS")),
            carrier=bool(msg.get_attr("IFLA_CARRIER")),
            operstate=str(msg.get_attr("IFLA_OPERSTATE") or "UNKNOWN"),
            admin_up=bool(msg["flags"] & IFF_UP),
            master=int(master) if master else None,
            kind=kind,
            pci_address=pci_address,
            driver=sysfs.driver(name, self._sys_root),
            udev_initialized=sysfs.udev_initialized(int(msg["index"]), self._run_root),
            bond=bond,
            pci_id=pci_id,
        )

    def create_bond(self, name: str, fail_over_mac: FailOverMac, num_peer_notif: int) -> int:
        with self._ipr(f"create bond {name}") as ipr:
            ipr.link(
                "add",
                ifname=name,
                kind="bond",
                bond_mode=BOND_MODE_ACTIVE_BACKUP,
                bond_miimon=BOND_MIIMON_MS,
                bond_fail_over_mac=int(fail_over_mac),
                bond_num_peer_notif=num_peer_notif,
            )
            found = ipr.link_lookup(ifname=name)
        if not found:
            raise NoSuchLink(f"bond {name} vanished right after creation", errno.ENODEV)
        return int(found[0])

    def enslave(self, index: int, bond: int) -> None:
        with self._ipr(f"enslave ifindex {index} to ifindex {bond}") as ipr:
            ipr.link("set", index=index, state="down")
            ipr.link("set", index=index, master=bond)

    def release(self, index: int) -> None:
        with self._ipr(f"release ifindex {index}") as ipr:
            ipr.link("set", index=index, master=0)

    def set_active_slave(self, bond: int, index: int) -> None:
        with self._ipr(f"make ifindex {index} the active slave of ifindex {bond}") as ipr:
            ipr.link("set", index=bond, kind="bond", bond_active_slave=index)

    def set_all_slaves_active(self, bond: int, on: bool) -> None:
        with self._ipr(f"set all_slaves_active {int(on)} on ifindex {bond}") as ipr:
            ipr.link("set", index=bond, kind="bond", bond_all_slaves_active=int(on))

    def set_mac(self, index: int, mac: str) -> None:
        with self._ipr(f"set MAC {mac} on ifindex {index}") as ipr:
            ipr.link("set", index=index, address=mac)

    def set_up(self, index: int, up: bool) -> None:
        state = "up" if up else "down"
        with self._ipr(f"set ifindex {index} {state}") as ipr:
            ipr.link("set", index=index, state=state)

    def wait_for(
        self,
        check: Callable[[list[Link]], T | None],
        deadline: float,
        only: Sequence[int] | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> T:
        wanted = frozenset(only) if only is not None else None
        udev_db = os.path.join(self._run_root, "udev", "data") if wanted is None else None
        with _LinkEvents(udev=wanted is None, udev_db=udev_db) as events:
            while True:
                if ready is None or ready():
                    links = self.list_links() if only is None else self.get_links(only)
                    result = check(links)
                    if result is not None:
                        return result
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise WaitTimeout("link state not reached before the deadline")
                    changed = events.wait(remaining)
                    if wanted is None or changed is None or changed & wanted:
                        break  # something that may matter changed: read again


def link_indexes(data: bytes) -> set[int] | None:
    """The ifindexes an rtnetlink datagram's RTM_NEWLINK/RTM_DELLINK messages are about.

    Each message is an nlmsghdr (length u32, type u16, flags u16, seq u32, pid u32)
    followed, for link messages, by an ifinfomsg whose ifi_index (s32) is at byte 4 of
    it; messages are padded to 4 bytes.  None if the datagram cannot be read that way:
    the caller then treats it as about any link.
    """
    indexes: set[int] = set()
    offset = 0
    while offset + NLMSG_HDR.size <= len(data):
        length, kind = NLMSG_HDR.unpack_from(data, offset)[:2]
        if length < NLMSG_HDR.size or offset + length > len(data):
            return None
        if kind in (RTM_NEWLINK, RTM_DELLINK):
            if length < NLMSG_HDR.size + IFI_INDEX_OFFSET + 4:
                return None
            (index,) = IFI_INDEX.unpack_from(data, offset + NLMSG_HDR.size + IFI_INDEX_OFFSET)
            indexes.add(index)
        offset += (length + 3) & ~3
    return indexes


class _LinkEvents:
    """Wake-ups on link changes: rtnetlink RTMGRP_LINK and (*udev*) udev's monitor group."""

    def __init__(self, udev: bool = True, udev_db: str | None = None) -> None:
        self._sockets: list[socket.socket] = []
        self._add(socket.NETLINK_ROUTE, RTMGRP_LINK, required=True)
        if udev:
            self._add(NETLINK_KOBJECT_UEVENT, UDEV_MONITOR_GROUP, required=False)
        self._poll = select.poll()
        for sock in self._sockets:
            self._poll.register(sock, select.POLLIN)
        self._inotify = _inotify_watch(udev_db) if udev_db else None
        if self._inotify is not None:
            self._poll.register(self._inotify, select.POLLIN)

    def _add(self, protocol: int, groups: int, required: bool) -> None:
        flags = socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
        sock = socket.socket(socket.AF_NETLINK, flags, protocol)
        try:
            sock.bind((0, groups))
        except OSError as exc:
            sock.close()
            if required:
                raise LinkError(f"cannot subscribe to link events: {exc}", exc.errno or 0) from exc
            log.debug("no udev monitor events (%s); relying on rtnetlink only", exc)
            return
        self._sockets.append(sock)

    def wait(self, timeout: float) -> set[int] | None:
        """Block until some event or the timeout, then drain every socket.

        Returns the ifindexes the rtnetlink events named, or None when any link may have
        changed: a udev event, an overrun (ENOBUFS: events were lost), an unreadable one.
        """
        self._poll.poll(max(0, int(timeout * 1000) + 1))
        changed: set[int] | None = set()
        for number, sock in enumerate(self._sockets):
            while True:
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    break
                except OSError as exc:  # ENOBUFS: we missed events; the re-read covers them
                    if exc.errno != errno.ENOBUFS:
                        raise
                    changed = None
                    continue
                if not data:
                    break
                named = link_indexes(data) if number == 0 else None  # 0: rtnetlink
                changed = None if changed is None or named is None else changed | named
        if self._inotify is not None and _drain(self._inotify):
            changed = None  # a database entry was written: any link may be done now
        return changed

    def __enter__(self) -> _LinkEvents:
        return self

    def __exit__(self, *exc: object) -> None:
        for sock in self._sockets:
            sock.close()
        if self._inotify is not None:
            os.close(self._inotify)


def _inotify_watch(directory: str) -> int | None:
    """A non-blocking inotify descriptor that becomes readable when a file is created or
    renamed into *directory*; None where inotify cannot be had (no such directory, no
    libc symbol, out of watches): the wait then has udev's monitor alone."""
    try:
        import ctypes  # only here: the agent's start-up does not pay for it

        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if libc.inotify_add_watch(fd, os.fsencode(directory), IN_CREATE | IN_MOVED_TO) < 0:
            error = ctypes.get_errno()
            os.close(fd)
            raise OSError(error, f"inotify_add_watch {directory}")
    except (OSError, AttributeError) as exc:
        log.debug("no inotify on %s (%s); udev's monitor alone", directory, exc)
        return None
    return fd


def _drain(fd: int) -> bool:
    """Read every pending inotify event of *fd*; whether there was any."""
    seen = False
    while True:
        try:
            if not os.read(fd, 65536):
                return seen
        except BlockingIOError:
            return seen
        seen = True
