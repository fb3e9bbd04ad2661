"""The console protocol against a real bash behind a unix socket, as the guest's tty shell is."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lab.console import ConsoleError, GuestConsole, GuestStopped
from lab.image import SHELL_READY_MARKER


def test_run_returns_output_and_exit_status(shell_socket: Path, tmp_path: Path) -> None:
    console = GuestConsole(shell_socket, tmp_path / "console.log")
    result = console.run("echo hello; printf 'a\\tb\\n'; (exit 7)")
    assert result.output == "hello\na\tb\n"
    assert result.status == 7


def test_run_passes_quotes_and_newlines_unchanged(shell_socket: Path, tmp_path: Path) -> None:
    console = GuestConsole(shell_socket, tmp_path / "console.log")
    text = 'it\'s "quoted" $HOME `x`\nsecond line'
    result = console.run(f"cat <<'EOF'\n{text}\nEOF")
    assert result.check() == text + "\n"


def test_each_run_sees_only_its_own_output(shell_socket: Path, tmp_path: Path) -> None:
    console = GuestConsole(shell_socket, tmp_path / "console.log")
    assert console.run("echo one").output == "one\n"
    assert console.run("echo two").output == "two\n"


def test_timeout_raises_with_output_so_far(shell_socket: Path, tmp_path: Path) -> None:
    console = GuestConsole(shell_socket, tmp_path / "console.log")
    with pytest.raises(ConsoleError, match="timed out"):
        console.run("echo started; sleep 3", timeout=0.5)


def test_check_raises_on_failure(shell_socket: Path, tmp_path: Path) -> None:
    console = GuestConsole(shell_socket, tmp_path / "console.log")
    with pytest.raises(ConsoleError, match="exited 1"):
        console.run("echo nope; false").check()


def test_unreachable_console_names_the_socket_and_log(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("[ 1.0] Kernel panic - not syncing\n")
    console = GuestConsole(tmp_path / "missing.sock", log)
    with pytest.raises(ConsoleError, match="Kernel panic") as exc:
        console.run("true")
    assert "missing.sock" in str(exc.value)


def test_wait_for_shell_reads_marker_after_offset(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text(f"{SHELL_READY_MARKER} 11.5\nold boot\n")
    console = GuestConsole(tmp_path / "c.sock", log)
    since = console.log_size()
    with log.open("a") as f:
        f.write(f"booting...\n{SHELL_READY_MARKER} 33.25\n")
    assert console.wait_for_shell(since, timeout=2) == 33.25


def test_wait_for_shell_times_out_with_log_tail(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("end Kernel panic - not syncing: VFS\n")
    console = GuestConsole(tmp_path / "c.sock", log)
    with pytest.raises(ConsoleError, match="VFS"):
        console.wait_for_shell(0, timeout=0.5)


def test_wait_for_shell_ends_once_the_guest_has_stopped(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    log.write_text("[ 2.0] booting\n")
    console = GuestConsole(tmp_path / "c.sock", log)
    started = time.monotonic()
    with pytest.raises(GuestStopped, match="stopped before its shell came up"):
        console.wait_for_shell(0, timeout=60, running=lambda: False)
    assert time.monotonic() - started < 5
