"""Run commands in the lab guest over its serial console.

The guest autologs root into a shell on ttyS0 with echo off and an empty prompt
(:mod:`lab.image`).  QEMU serves the console as a unix socket and also copies everything
to a log file, which is how a boot is followed even while no one is connected.

A command is sent base64-encoded (so any text survives the tty) followed by a marker that
carries a fresh token and the exit status; the marker as typed differs from the marker as
printed, so even an echoing tty could not fake the end of the output.
"""

from __future__ import annotations

import base64
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lab.image import SHELL_READY_MARKER


class ConsoleError(RuntimeError):
    """The guest did not answer on its console; the message carries the console log's tail."""


class GuestStopped(ConsoleError):
    """The guest's QEMU ended while its shell was awaited: nothing will come up, so the
    wait ends at once rather than at its timeout."""


@dataclass(frozen=True)
class ExecResult:
    output: str
    status: int

    def check(self) -> str:
        if self.status != 0:
            raise ConsoleError(f"guest command exited {self.status}:\n{self.output}")
        return self.output


def log_tail(log_file: Path, lines: int = 40) -> str:
    if not log_file.exists():
        return f"(no console log at {log_file})"
    text = log_file.read_text(errors="replace").splitlines()[-lines:]
    return f"--- last {len(text)} lines of {log_file} ---\n" + "\n".join(text)


class GuestConsole:
    """The serial console of the guest on one host."""

    def __init__(self, socket_path: Path, log_file: Path) -> None:
        self.socket_path = socket_path
        self.log_file = log_file

    def wait_for_shell(
        self, since: int, timeout: float, *, running: Callable[[], bool] | None = None
    ) -> float:
        """Wait until the login shell prints its marker after log offset *since*.

        Returns the guest's uptime at that moment, as the shell reported it.  *running*
        says whether the guest's QEMU still runs; once it says no, :class:`GuestStopped`.
        """
        pattern = re.compile(re.escape(SHELL_READY_MARKER) + r" ([0-9.]+)")
        m = self.wait_for(pattern, since, timeout, "its shell came up", running=running)
        return float(m.group(1))

    def wait_for(
        self,
        pattern: re.Pattern[str],
        since: int,
        timeout: float,
        what: str,
        *,
        running: Callable[[], bool] | None = None,
    ) -> re.Match[str]:
        """The first match of *pattern* the guest prints after log offset *since* (*what*
        names it in the error); once *running* says the guest's QEMU stopped,
        :class:`GuestStopped`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_file.exists():
                with self.log_file.open("rb") as f:
                    f.seek(since)
                    m = pattern.search(f.read().decode(errors="replace"))
                if m:
                    return m
            if running is not None and not running():
                raise GuestStopped(f"the guest stopped before {what}\n{log_tail(self.log_file)}")
            time.sleep(0.2)
        raise ConsoleError(
            f"the guest printed nothing saying {what} in {timeout:.0f} s\n"
            + log_tail(self.log_file)
        )

    def log_size(self) -> int:
        return self.log_file.stat().st_size if self.log_file.exists() else 0

    @contextmanager
    def typing(self, command: str) -> Iterator[None]:
        """Type *command* into the guest's shell and hold the console for the block, for
        a command the shell does not live through (a reboot): what it says is only in
        the console log.  Held, because QEMU drops the input the guest's UART has not
        taken yet when the connection closes (a bare send typed half a reboot); and read
        meanwhile, because QEMU writes the guest's output to the connection and to the
        log alike, so an unread connection stalls the guest's console, and with it a
        shutdown that prints on it."""
        done = threading.Event()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.2)
            sock.connect(str(self.socket_path))
            sock.sendall(f"{command}\n".encode())

            def drain() -> None:
                while not done.is_set():
                    try:
                        if not sock.recv(65536):
                            return
                    except TimeoutError:
                        continue
                    except OSError:
                        return

            reader = threading.Thread(target=drain, daemon=True)
            reader.start()
            try:
                yield
            finally:
                done.set()
                reader.join()

    def run(self, command: str, timeout: float = 60.0) -> ExecResult:
        """Run *command* with bash in the guest; return its output and exit status."""
        token = secrets.token_hex(6)
        encoded = base64.b64encode(command.encode()).decode()
        line = (
            f'eval "$(echo {encoded} | base64 -d)" </dev/null 2>&1; '
            f'echo "__PTMIG_END_""{token}_$?__"\n'
        )
        end = re.compile(rf"__PTMIG_END_{token}_(\d+)__")
        deadline = time.monotonic() + timeout
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(min(timeout, 10.0))
            sock.connect(str(self.socket_path))
        except OSError as exc:
            raise ConsoleError(
                f"cannot connect to the console {self.socket_path}: {exc}\n"
                + log_tail(self.log_file)
            ) from exc
        with sock:
            sock.sendall(line.encode())
            buf = b""
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    sock.sendall(b"\x03")  # interrupt it so the shell is free for the next one
                    raise ConsoleError(
                        f"guest command timed out after {timeout:.0f} s: {command!r}\n"
                        f"output so far: {buf.decode(errors='replace')[-2000:]}\n"
                        + log_tail(self.log_file)
                    )
                sock.settimeout(remaining)
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    raise ConsoleError(
                        f"console closed while running {command!r}\n" + log_tail(self.log_file)
                    )
                buf += chunk
                text = buf.decode(errors="replace")
                m = end.search(text)
                if m:
                    output = text[: m.start()].replace("\r", "")
                    return ExecResult(output, int(m.group(1)))
