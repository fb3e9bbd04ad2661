"""L1's console in the nested lab: a command that will not stop cannot keep L1's one shell
from the commands after it, and a console that runs nothing is reported from L1's second
console (real bash behind unix sockets, as L1's ttyS0 and ttyS1 are)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lab.console import ConsoleError, GuestConsole
from lab.nested import vlab as vlab_module
from lab.nested.vlab import L1_SILENT, VfioLab, bounded, is_l1_failure_under_l2
from tests.unit.lab.conftest import shell_at, silent_at


def test_a_bounded_command_that_ignores_int_and_term_is_killed_before_the_console_gives_up(
    shell_socket: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vlab_module, "L1_KILL_AFTER_S", 0.5)
    console = GuestConsole(shell_socket, tmp_path / "console.log")
    stubborn = "trap '' INT TERM; echo started; sleep 60"
    with pytest.raises(ConsoleError, match="timed out"):
        console.run(stubborn, timeout=2)  # unbounded, it holds the shell past the console
    shell_socket.unlink()  # that shell is still in its sleep: a new one for the bounded run
    with shell_at(shell_socket):
        began = time.monotonic()
        result = console.run(bounded(stubborn, 9.5), timeout=9.5)
        assert result.status == 137, result  # KILLed: TERM was ignored
        assert result.output.startswith("started\n"), result
        assert time.monotonic() - began < 9.5 - vlab_module.L1_EXEC_MARGIN_S + 2
        assert console.run("echo next", timeout=5).output == "next\n"


@pytest.fixture
def l1_consoles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A nested lab's run dir in *tmp_path*, its first console's probe shortened."""
    monkeypatch.setattr(vlab_module, "run_dir", lambda: tmp_path)
    monkeypatch.setattr(vlab_module, "L1_PROBE_S", 0.5)
    monkeypatch.setattr(vlab_module, "L1_REPORT_S", 5.0)
    return tmp_path


def test_an_l1_whose_console_answers_gives_no_report(l1_consoles: Path) -> None:
    with shell_at(l1_consoles / "console.sock"):
        assert VfioLab().l1_console_report() is None


def test_a_silent_l1_console_is_reported_by_what_its_second_console_sees(
    l1_consoles: Path,
) -> None:
    second = shell_at(l1_consoles / "console2.sock", echo=True)
    with silent_at(l1_consoles / "console.sock"), second:
        report = VfioLab().l1_console_report()
    assert report is not None
    assert report.startswith(f"{L1_SILENT} in 0.5 s; its second console (ttyS1) saw:\nuptime "), (
        report
    )
    for part in ("uptime ", "--- on ttyS0", "--- in uninterruptible sleep", "--- the kernel log"):
        assert part in report, report


def test_an_l1_silent_on_both_consoles_is_reported_by_its_last_kernel_lines(
    l1_consoles: Path,
) -> None:
    (l1_consoles / "console.log").write_text(
        "__PTMIG_END_0ca2d481a784_0__\n"
        "[  812.100000] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [CPU 0/KVM:1042]\n"
        "[  812.100001] Modules linked in: kvm_amd kvm vfio_pci igb e1000e\n"
    )
    with silent_at(l1_consoles / "console.sock"), silent_at(l1_consoles / "console2.sock"):
        report = VfioLab().l1_console_report()
    assert report is not None
    assert report.startswith(f"{L1_SILENT} in 0.5 s, nor its second console"), report
    assert "soft lockup" in report
    assert is_l1_failure_under_l2(report)  # L1's kernel failing in L2's vCPU thread


def test_a_silent_l1_console_without_a_kernel_failure_is_not_called_the_labs() -> None:
    report = f"{L1_SILENT} in 20 s; its second console (ttyS1) saw:\n--- on ttyS0\n  PID STAT"
    assert not is_l1_failure_under_l2(report)
