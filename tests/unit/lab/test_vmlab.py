"""VmLab's warm-up of the hosts' QEMU capabilities (against libvirt's test driver), and its
boots' wait for the guest's shell when QEMU ends first."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from lab import vmlab
from lab.console import GuestConsole, GuestStopped
from lab.image import SHELL_READY_MARKER, GuestImage
from lab.vmlab import BOOT_ATTEMPTS, VmLab


@dataclass
class _Host:
    name: str
    uri: str


def test_warm_capabilities_asks_every_host_and_an_unreachable_one_only_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PTMIG_LAB_DIR", str(tmp_path))  # no shared lab state is read
    lab = VmLab()
    lab.hosts = {  # type: ignore[dict-item]
        "hosta": _Host("hosta", "test:///default"),
        "hostb": _Host("hostb", f"qemu+unix:///system?socket={tmp_path}/no-such-socket"),
    }
    with caplog.at_level(logging.INFO, logger="lab.vmlab"):
        lab.warm_capabilities()
    assert "hostb: no connection to warm its capabilities" in caplog.text
    assert "hosta:" not in caplog.text  # answered
    assert "QEMU capabilities of both hosts ready" in caplog.text


ABORT = (
    "qemu-system-x86_64: system/physmem.c:2678: iotlb_to_section: "
    "Assertion `section_index < d->map.sections_nb' failed.\n"
)


@dataclass
class _BootHost:
    name: str
    log_dir: Path

    def qemu_log(self, domain: str) -> Path:
        return self.log_dir / f"{domain}.log"


class _Domain:
    """A domain whose boots play a script: each create() appends one entry's QEMU log
    line, and either ends the domain (QEMU gone) or prints the shell's marker."""

    def __init__(self, host: _BootHost, console_log: Path, script: list[str | None]) -> None:
        self.host, self.console_log, self.script = host, console_log, script
        self.creates = 0
        self.active = False

    def create(self) -> None:
        qemu_line = self.script[self.creates]
        self.creates += 1
        with self.host.qemu_log("g").open("a") as f:
            f.write(f"boot {self.creates}\n")
            if qemu_line is not None:
                f.write(qemu_line)
        self.active = qemu_line is None
        if self.active:
            with self.console_log.open("a") as f:
                f.write(f"{SHELL_READY_MARKER} 12.5\n")

    def isActive(self) -> int:  # libvirt's name
        return int(self.active)


def _boot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, script: list[str | None]
) -> tuple[VmLab, _Domain, list[Path], Callable[[], float]]:
    monkeypatch.setenv("PTMIG_LAB_DIR", str(tmp_path))
    lab = VmLab()
    host = _BootHost("hosta", tmp_path)
    console_log = tmp_path / "console.log"
    console_log.write_text("an earlier boot\n")
    dom = _Domain(host, console_log, script)
    console = GuestConsole(tmp_path / "c.sock", console_log)
    monkeypatch.setattr(lab, "console", lambda host, name: console)
    overlays: list[Path] = []
    monkeypatch.setattr(vmlab, "_overlay", lambda image, disk: overlays.append(disk))
    disk = tmp_path / "disk.qcow2"
    boot = lab._start(host, "g", dom, GuestImage(tmp_path), disk)  # type: ignore[arg-type]
    return lab, dom, overlays, lambda: lab._await_shell(boot)


def test_a_boot_qemu_aborted_on_its_own_assertion_is_booted_again_from_a_fresh_overlay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    lab, dom, overlays, await_shell = _boot(tmp_path, monkeypatch, [ABORT, None])
    with caplog.at_level(logging.WARNING, logger="lab.vmlab"):
        assert await_shell() == 12.5
    assert dom.creates == 2 and overlays == [tmp_path / "disk.qcow2"]
    assert lab.state.qemu_aborts == [
        "g: system/physmem.c:2678: iotlb_to_section: "
        "Assertion `section_index < d->map.sections_nb' failed."
    ]
    assert "QEMU aborted before the guest's shell came up" in caplog.text


def test_a_guest_that_stops_otherwise_fails_at_once_with_its_qemu_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, dom, overlays, await_shell = _boot(
        tmp_path, monkeypatch, ["shutting down, reason=destroyed\n", None]
    )
    started = time.monotonic()
    with pytest.raises(GuestStopped, match="reason=destroyed") as exc:
        await_shell()
    assert time.monotonic() - started < 5  # not BOOT_TIMEOUT
    assert "boot 1" in str(exc.value) and dom.creates == 1 and overlays == []


def test_qemu_aborting_on_every_boot_fails_after_the_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab, dom, overlays, await_shell = _boot(tmp_path, monkeypatch, [ABORT, ABORT, None])
    with pytest.raises(GuestStopped, match="iotlb_to_section") as exc:
        await_shell()
    assert dom.creates == BOOT_ATTEMPTS == 2 and overlays == [tmp_path / "disk.qcow2"]
    assert "boot 2" in str(exc.value) and "boot 1" not in str(exc.value)
    assert len(lab.state.qemu_aborts) == 1
