"""Addresses, sysfs predicates (fake /sys in tmp), the operation log."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from guest_agent.addresses import AddressError, parse_mac, parse_pci
from guest_agent.operations import OperationIdReused, OperationLog
from guest_agent.sysfs import pci_address, udev_initialized


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
    return root


def test_pci_address_from_sysfs(tmp_path: Path) -> None:
    root = str(fake_sys(tmp_path))
    assert pci_address("enp1s0", root) == "0000:01:00.0"  # walked up past virtio0
    assert pci_address("enp2s0", root) == "0000:02:00.0"
    assert pci_address("bond0", root) is None
    assert pci_address("gone0", root) is None


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


def test_operation_log_is_bounded_and_keeps_running_entries() -> None:
    log: OperationLog[int] = OperationLog(capacity=2)
    release = threading.Event()
    threading.Thread(target=lambda: log.run("slow", 0, lambda: release.wait() and 1)).start()
    time.sleep(0.05)
    for number in range(5):
        log.run(str(number), 0, lambda n=number: n)  # type: ignore[misc]
    assert len(log) <= 3
    assert log.run("4", 0, lambda: 99) == (4, True)
    assert log.run("0", 0, lambda: 99) == (99, False)  # forgotten, so it runs
    release.set()
    assert log.run("slow", 0, lambda: 0) == (1, True)


def test_link_dump_interrupted_by_a_change_is_redone(monkeypatch: pytest.MonkeyPatch) -> None:
    """NLM_F_DUMP_INTR (a link changed during the dump: bonds being made) is not an error."""
    from pyroute2.netlink.exceptions import NetlinkError

    from guest_agent import netlink

    dumps = []

    class FlakyIPRoute:
        def __enter__(self) -> FlakyIPRoute:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

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

    class BrokenIPRoute:
        def __enter__(self) -> BrokenIPRoute:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def get_links(self) -> list[object]:
            raise NetlinkError(-1, "dump interrupted")

    monkeypatch.setattr(netlink, "_pyroute2", lambda: (BrokenIPRoute, NetlinkError))
    with pytest.raises(LinkError, match="dump interrupted"):
        netlink.NetlinkLinks().list_links()
