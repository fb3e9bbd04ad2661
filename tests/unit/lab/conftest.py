"""Consoles for the lab's unit tests: a real bash behind a unix socket, as a guest's tty
shell is, and a console that takes commands and runs none."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def shell_at(path: Path, *, echo: bool = False) -> Iterator[Path]:
    """A unix socket server at *path* that hands each connection to one long-lived bash,
    like ttyS0; *echo*: what is typed comes back first, as on a tty with echo on (L1's
    ttyS1)."""
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
                if echo:
                    conn.sendall(data)
                bash.stdin.write(data.replace(b"\x03", b""))  # type: ignore[union-attr]
                bash.stdin.flush()  # type: ignore[union-attr]

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield path
    finally:
        stop.set()
        server.close()
        bash.kill()
        bash.wait()


@contextlib.contextmanager
def silent_at(path: Path) -> Iterator[Path]:
    """A unix socket server at *path* that accepts connections and reads what is typed,
    but prints nothing: a console whose shell is stuck."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)
    held: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield path
    finally:
        server.close()
        for conn in held:
            conn.close()


@pytest.fixture
def shell_socket(tmp_path: Path) -> Iterator[Path]:
    with shell_at(tmp_path / "console.sock") as path:
        yield path
