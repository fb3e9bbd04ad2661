"""The console protocol against a real bash behind a unix socket, as the guest's tty shell is."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lab.console import ConsoleError, GuestConsole, GuestStopped
from lab.image import SHELL_READY_MARKER


@pytest.fixture
def shell_socket(tmp_path: Path) -> Iterator[Path]:
    """A unix socket server that hands each connection to one long-lived bash, like ttyS0."""
    path = tmp_path / "console.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    bash = subprocess.Popen(
        ["bash", "--norc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert bash.stdin and bash.stdout
    stop = threading.Event()

    def pump_out(conn_box: list[socket.socket]) -> None:
        while True:
            data = bash.stdout.read1(4096)  # type: ignore[union-attr]
            if not data:
                return
            if conn_box:
                # no host connected: the byte is lost, as on the real port
                with contextlib.suppress(OSError):
                    conn_box[-1].sendall(data)

    def serve() -> None:
        box: list[socket.socket] = []
        threading.Thread(target=pump_out, args=(box,), daemon=True).start()
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            box.append(conn)
            while True:
                data = conn.recv(4096)
                if not data:
                    break
                bash.stdin.write(data.replace(b"\x03", b""))  # type: ignore[union-attr]
                bash.stdin.flush()  # type: ignore[union-attr]

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield path
    stop.set()
    server.close()
    bash.kill()
    bash.wait()


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
