"""Addresses, sysfs predicates (fake /sys in tmp), the operation log."""

from __future__ import annotations

import gc
import os
import threading
import time
import weakref
from pathlib import Path

import pytest
from agent_reachable import reachable

from guest_agent.addresses import AddressError, parse_mac, parse_pci
from guest_agent.operations import OperationIdReused, OperationLog
from guest_agent.sysfs import (
    driver,
    names_ifindex,
    pci_facts,
    pci_netdev_initialized,
    udev_initialized,
)


@pytest.mark.parametrize(
    ("text", "mac"),
    [("52:54:00:AA:00:01", "52:54:00:aa:00:01"), (" 52-54-00-aa-00-01 ", "52:54:00:aa:00:01")],
)
def test_parse_mac_normalises(text: str, mac: str) -> None:
    assert parse_mac(text) == mac


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("52:54:00:aa:00", "malformed"),
        ("52:54:00:aa:00:0g", "malformed"),
        ("", "malformed"),
        ("01:00:5e:00:00:01", "multicast"),
        ("00:00:00:00:00:00", "not usable"),
    ],
)
def test_parse_mac_refuses(text: str, why: str) -> None:
    with pytest.raises(AddressError, match=why):
        parse_mac(text)


def test_parse_pci() -> None:
    assert parse_pci("0000:02:00.0") == "0000:02:00.0"
    assert parse_pci("02:1F.7") == "0000:02:1f.7"
    for bad in ("2:00.0", "0000:02:00.8", "0000:02:00", "eth0"):
        with pytest.raises(AddressError, match="malformed PCI"):
            parse_pci(bad)


def fake_sys(root: Path) -> Path:
    """/sys as q35 shows it: virtio-net behind virtio0, e1000e directly, a bond."""
    pci = root / "devices" / "pci0000:00"
    virtio = pci / "0000:00:02.0" / "0000:01:00.0" / "virtio0"
    e1000e = pci / "0000:00:02.1" / "0000:02:00.0"
    net = root / "class" / "net"
    for path in (virtio, e1000e, net / "enp1s0", net / "enp2s0", net / "bond0"):
        path.mkdir(parents=True)
    (net / "enp1s0" / "device").symlink_to(os.path.relpath(virtio, net / "enp1s0"))
    (net / "enp2s0" / "device").symlink_to(os.path.relpath(e1000e, net / "enp2s0"))
    drivers = (
        root / "bus" / "virtio" / "drivers" / "virtio_net",
        root / "bus" / "pci" / "drivers" / "e1000e",
    )
    for where, drv in zip((virtio, e1000e), drivers, strict=True):
        drv.mkdir(parents=True)
        (where / "driver").symlink_to(os.path.relpath(drv, where))
    return root


def test_pci_address_from_sysfs(tmp_path: Path) -> None:
    root = str(fake_sys(tmp_path))
    assert pci_facts("enp1s0", root)[0] == "0000:01:00.0"  # walked up past virtio0
    assert pci_facts("enp2s0", root)[0] == "0000:02:00.0"
    assert pci_facts("bond0", root) == (None, None)
    assert pci_facts("gone0", root) == (None, None)


def test_driver_from_sysfs(tmp_path: Path) -> None:
    root = str(fake_sys(tmp_path))
    assert driver("enp1s0", root) == "virtio_net"  # the virtio device's, not the PCI function's
    assert driver("enp2s0", root) == "e1000e"
    assert driver("bond0", root) is None
    assert driver("gone0", root) is None


def test_pci_id_from_sysfs(tmp_path: Path) -> None:
    """What a guest-managed team's rule can name: the PCI function's vendor:device."""
    root = fake_sys(tmp_path)
    pci = root / "devices" / "pci0000:00"
    (pci / "0000:00:02.1" / "0000:02:00.0" / "vendor").write_text("0x8086\n")
    (pci / "0000:00:02.1" / "0000:02:00.0" / "device").write_text("0x10D3\n")
    (pci / "0000:00:02.0" / "0000:01:00.0" / "vendor").write_text("0x1af4\n")
    (pci / "0000:00:02.0" / "0000:01:00.0" / "device").write_text("0x1041\n")
    assert pci_facts("enp2s0", str(root))[1] == "8086:10d3"
    assert pci_facts("enp1s0", str(root))[1] == "1af4:1041"  # the function's, past virtio0
    assert pci_facts("bond0", str(root))[1] is None
    (pci / "0000:00:02.1" / "0000:02:00.0" / "device").unlink()
    assert pci_facts("enp2s0", str(root)) == ("0000:02:00.0", None)


def test_pci_netdev_initialized(tmp_path: Path) -> None:
    """The NIC's netdev under its PCI function, and udev's entry for its ifindex."""
    root = fake_sys(tmp_path / "sys")
    run = tmp_path / "run"
    devices = root / "bus" / "pci" / "devices"
    devices.mkdir(parents=True)
    pci = root / "devices" / "pci0000:00"
    for address, function in (
        ("0000:02:00.0", pci / "0000:00:02.1" / "0000:02:00.0"),
        ("0000:01:00.0", pci / "0000:00:02.0" / "0000:01:00.0"),
    ):
        (devices / address).symlink_to(os.path.relpath(function, devices))
    assert not pci_netdev_initialized("0000:02:00.0", str(root), str(run))  # no netdev yet
    (pci / "0000:00:02.1" / "0000:02:00.0" / "net" / "eth0").mkdir(parents=True)
    (pci / "0000:00:02.1" / "0000:02:00.0" / "net" / "eth0" / "ifindex").write_text("7\n")
    (run / "udev" / "data").mkdir(parents=True)
    assert not pci_netdev_initialized("0000:02:00.0", str(root), str(run))  # udev not done
    (run / "udev" / "data" / "n7").touch()
    assert pci_netdev_initialized("0000:02:00.0", str(root), str(run))
    virtio_net = pci / "0000:00:02.0" / "0000:01:00.0" / "virtio0" / "net" / "enp1s0"
    virtio_net.mkdir(parents=True)
    (virtio_net / "ifindex").write_text("2\n")
    (run / "udev" / "data" / "n2").touch()
    assert pci_netdev_initialized("0000:01:00.0", str(root), str(run))  # one level down
    assert not pci_netdev_initialized("0000:09:00.0", str(root), str(run))  # no such function


def test_udev_initialized(tmp_path: Path) -> None:
    assert udev_initialized(5, str(tmp_path))  # no udev database: nothing to wait for
    data = tmp_path / "udev" / "data"
    data.mkdir(parents=True)
    assert not udev_initialized(5, str(tmp_path))
    (data / "n5").touch()
    assert udev_initialized(5, str(tmp_path))


def test_operation_log_replays_values_and_errors() -> None:
    log: OperationLog[str] = OperationLog(capacity=2)
    calls: list[str] = []
    assert log.run("a", "fp", lambda: calls.append("a") or "done") == ("done", False)
    assert log.run("a", "fp", lambda: calls.append("again") or "x") == ("done", True)

    def fail() -> str:
        calls.append("b")
        raise ValueError("nope")

    for _ in range(2):
        with pytest.raises(ValueError, match="nope"):
            log.run("b", "fp", fail)
    assert calls == ["a", "b"]
    with pytest.raises(OperationIdReused):
        log.run("a", "other request", lambda: "x")


class _CallState:
    """Stands for what gRPC's frames hold while a call runs (its call state, connection)."""


def test_operation_log_keeps_no_frame_of_a_failed_call() -> None:
    """A recorded failure must not keep its call's frames, nor their locals, alive."""
    log: OperationLog[str] = OperationLog(capacity=4)

    def fail() -> str:
        raise ValueError("refused")

    def call() -> weakref.ref[_CallState]:
        state = _CallState()  # a local of the calling frame, as gRPC's are
        with pytest.raises(ValueError, match="refused") as raised:
            log.run("a", "fp", fail)
        assert raised.value.__traceback__ is not None  # the first caller's, for its log
        return weakref.ref(state)

    first, replay = call(), call()
    gc.collect()  # the frames and the exceptions that were raised in them form cycles
    assert first() is None
    assert replay() is None
    with pytest.raises(ValueError, match="refused"):  # still recorded, still replayed
        log.run("a", "fp", lambda: "ran again")


def test_finished_operations_keep_no_lock_of_their_own() -> None:
    """A finished entry shares one set Event: the log keeps hundreds of entries for a long
    time, and each Event is a Condition, a lock and a deque (issue 24's RSS growth)."""
    log: OperationLog[int] = OperationLog(capacity=8)
    running, release = threading.Event(), threading.Event()

    def slow() -> int:
        running.set()
        release.wait(10)
        return 1

    for number in range(5):
        log.run(str(number), 0, lambda n=number: n)  # type: ignore[misc]
    with pytest.raises(ValueError):
        log.run("failed", 0, lambda: int("x"))
    waiter = threading.Thread(target=lambda: log.run("slow", 0, slow))
    waiter.start()
    assert running.wait(10)
    conditions = [obj for obj in reachable(log) if isinstance(obj, threading.Condition)]
    assert len(log) == 7 and len(conditions) == 2  # the running entry's and the shared one
    release.set()
    waiter.join(10)
    conditions = [obj for obj in reachable(log) if isinstance(obj, threading.Condition)]
    assert len(conditions) == 1
    assert log.run("slow", 0, lambda: 0) == (1, True)  # a finished entry still replays
    assert log.run("3", 0, lambda: 0) == (3, True)


def test_operation_log_is_bounded_and_keeps_running_entries() -> None:
    log: OperationLog[int] = OperationLog(capacity=2)
    running, release = threading.Event(), threading.Event()

    def slow() -> int:
        running.set()  # its entry is in the log, not done
        release.wait(10)
        return 1

    threading.Thread(target=lambda: log.run("slow", 0, slow)).start()
    assert running.wait(10)
    for number in range(5):
        log.run(str(number), 0, lambda n=number: n)  # type: ignore[misc]
    assert len(log) <= 3
    assert log.run("4", 0, lambda: 99) == (4, True)
    assert log.run("0", 0, lambda: 99) == (99, False)  # forgotten, so it runs
    release.set()
    assert log.run("slow", 0, lambda: 0) == (1, True)


class _FakeIPRoute:
    """What guest_agent.netlink does with an IPRoute: a context manager; subclasses add
    the calls a test scripts (get_links, link)."""

    def __enter__(self) -> _FakeIPRoute:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_link_dump_interrupted_by_a_change_is_redone(monkeypatch: pytest.MonkeyPatch) -> None:
    """NLM_F_DUMP_INTR (a link changed during the dump: bonds being made) is not an error."""
    from pyroute2.netlink.exceptions import NetlinkError

    from guest_agent import netlink

    dumps = []

    class FlakyIPRoute(_FakeIPRoute):
        def get_links(self) -> list[object]:
            dumps.append(1)
            if len(dumps) < 3:
                raise NetlinkError(-1, "dump interrupted")
            return []

    monkeypatch.setattr(netlink, "_pyroute2", lambda: (FlakyIPRoute, NetlinkError))
    assert netlink.NetlinkLinks().list_links() == []
    assert len(dumps) == 3


def test_link_dump_that_keeps_failing_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    from guest_agent import netlink
    from guest_agent.links import LinkError

    class BrokenIPRoute(_FakeIPRoute):
        def get_links(self) -> list[object]:
            raise NetlinkError(-1, "dump interrupted")

    monkeypatch.setattr(netlink, "_pyroute2", lambda: (BrokenIPRoute, NetlinkError))
    with pytest.raises(LinkError, match="dump interrupted"):
        netlink.NetlinkLinks().list_links()


class _Attrs:
    """A netlink message as guest_agent.netlink reads it: get_attr() and a few fields."""

    def __init__(self, attrs: dict[str, object], **fields: object) -> None:
        self._attrs = attrs
        self._fields = fields

    def get_attr(self, name: str) -> object:
        return self._attrs.get(name)

    def __getitem__(self, name: str) -> object:
        return self._fields[name]


def _nic(index: int, name: str, master: int | None) -> _Attrs:
    attrs: dict[str, object] = {"IFLA_IFNAME": name, "IFLA_CARRIER": 1}
    if master:
        attrs["IFLA_MASTER"] = master
    return _Attrs(attrs, index=index, flags=1)


def _bond(index: int, name: str, active: int | None) -> _Attrs:
    data = _Attrs({"IFLA_BOND_MODE": 1, "IFLA_BOND_ACTIVE_SLAVE": active})
    info = _Attrs({"IFLA_INFO_KIND": "bond", "IFLA_INFO_DATA": data})
    return _Attrs({"IFLA_IFNAME": name, "IFLA_LINKINFO": info}, index=index, flags=1)


def test_link_dump_torn_by_an_enslave_is_redone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The Debian 13 start-up race: the dump lists enp3s0 before the agent enslaves it and
    bond1 after it made enp3s0 active.  The kernel does not flag that dump (no link came
    or went); read as it is, GetState named an active member outside the bond."""
    from pyroute2.netlink.exceptions import NetlinkError

    from guest_agent import netlink

    torn = [_nic(3, "enp3s0", master=None), _bond(9, "bond1", active=3)]
    whole = [_nic(3, "enp3s0", master=9), _bond(9, "bond1", active=3)]
    dumps = [torn, torn, whole]

    class RacingIPRoute(_FakeIPRoute):
        def get_links(self) -> list[_Attrs]:
            return dumps.pop(0)

    monkeypatch.setattr(netlink, "_pyroute2", lambda: (RacingIPRoute, NetlinkError))
    links = netlink.NetlinkLinks(str(tmp_path), str(tmp_path)).list_links()
    assert not dumps, "read until the dump agreed with itself"
    assert [(link.name, link.master) for link in links] == [("enp3s0", 9), ("bond1", None)]


def test_link_renamed_while_its_dump_is_read_is_read_again_under_its_new_name(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The dump says eth0; by the time its sysfs facts are read udev has named it enp2s0
    (the lab's guest-managed team missed its NIC: PCI address found, driver not; and a
    bind reported the name eth0 for a NIC udev had named enp2s0).  `Links.list_links`
    names each link as its facts were read, which the team logic relies on."""
    from pyroute2.netlink.exceptions import NetlinkError

    from guest_agent import netlink

    root = fake_sys(tmp_path)
    for name, index in (("enp1s0", 2), ("enp2s0", 5), ("bond0", 9)):
        (root / "class" / "net" / name / "ifindex").write_text(f"{index}\n")
    gets: list[int] = []

    class RenamingIPRoute(_FakeIPRoute):
        def get_links(self) -> list[_Attrs]:
            return [_nic(2, "enp1s0", master=None), _nic(5, "eth0", master=None)]

        def link(self, command: str, index: int) -> list[_Attrs]:
            gets.append(index)
            return [_nic(index, "enp2s0", master=None)]

    monkeypatch.setattr(netlink, "_pyroute2", lambda: (RenamingIPRoute, NetlinkError))
    links = netlink.NetlinkLinks(str(root), str(tmp_path)).list_links()
    assert gets == [5]  # only the renamed one read again
    assert [(ln.name, ln.pci_address, ln.driver) for ln in links] == [
        ("enp1s0", "0000:01:00.0", "virtio_net"),
        ("enp2s0", "0000:02:00.0", "e1000e"),
    ]


def test_link_gone_while_its_dump_is_read_is_returned_as_dumped(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    from guest_agent import netlink

    root = fake_sys(tmp_path)

    class UnpluggingIPRoute(_FakeIPRoute):
        def get_links(self) -> list[_Attrs]:
            return [_nic(7, "enp7s0", master=None)]

        def link(self, command: str, index: int) -> list[_Attrs]:
            raise NetlinkError(19, "No such device")

    monkeypatch.setattr(netlink, "_pyroute2", lambda: (UnpluggingIPRoute, NetlinkError))
    links = netlink.NetlinkLinks(str(root), str(tmp_path)).list_links()
    assert [(ln.index, ln.name, ln.pci_address) for ln in links] == [(7, "enp7s0", None)]


def test_names_ifindex(tmp_path: Path) -> None:
    assert names_ifindex("eth0", 5, str(tmp_path))  # no /sys/class/net: nothing to ask
    root = fake_sys(tmp_path)
    (root / "class" / "net" / "enp2s0" / "ifindex").write_text("5\n")
    assert names_ifindex("enp2s0", 5, str(root))
    assert not names_ifindex("enp2s0", 6, str(root))  # the name is another link's now
    assert not names_ifindex("eth0", 5, str(root))  # renamed away


def test_contradictions_of_a_link_dump() -> None:
    from guest_agent.links import BondInfo, FailOverMac, Link, contradiction

    def link(index: int, master: int | None = None, active: int | None = None) -> Link:
        bond = BondInfo(1, active, FailOverMac.NONE, 100) if active is not None else None
        return Link(
            index, f"l{index}", None, None, True, "UP", True, master, None, None, True, bond
        )

    assert contradiction([link(1, master=2), link(2, active=1)]) is None
    assert "not enslaved" in str(contradiction([link(1), link(2, active=1)]))
    assert "not in the dump" in str(contradiction([link(2, active=7)]))
    assert "master ifindex 5" in str(contradiction([link(1, master=5)]))


def test_a_udev_database_entry_written_wakes_a_link_wait(tmp_path: Path) -> None:
    """udev tells its monitor only after its RUN programs; the entry it writes before
    them (a temporary file renamed in) wakes the wait at once."""
    from guest_agent.netlink import _LinkEvents

    (tmp_path / "n7.tmp").write_text("I:1\n")
    timer = threading.Timer(0.2, os.rename, (tmp_path / "n7.tmp", tmp_path / "n7"))
    with _LinkEvents(udev=False, udev_db=str(tmp_path)) as events:
        started = time.monotonic()
        timer.start()
        woken = events.wait(5.0)
        took = time.monotonic() - started
    timer.join()
    assert woken is None  # any link may have changed
    assert 0.15 <= took < 2.0


def test_a_link_wait_without_a_udev_database_directory_still_works(tmp_path: Path) -> None:
    from guest_agent.netlink import _LinkEvents

    with _LinkEvents(udev=False, udev_db=str(tmp_path / "absent")) as events:
        started = time.monotonic()
        assert events.wait(0.2) == set()  # no event: nothing named
        assert time.monotonic() - started >= 0.2
