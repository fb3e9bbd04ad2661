"""lab.nested.kicker against a QMP server on a real unix socket (QEMU's protocol as its
docs give it: a greeting, then one JSON reply per command, events in between)."""

from __future__ import annotations

import json
import socket
import threading
from pathlib import Path

import pytest

from lab.nested.kicker import Kicker, Qmp, QmpError


class FakeMonitor:
    """Answers QMP on *path*; records the commands; refuses *refuse* with an error and
    sends an event before every reply (a client must skip events)."""

    def __init__(self, path: Path, refuse: str = "") -> None:
        self.commands: list[str] = []
        self.refuse = refuse
        self.cont_seen = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(path))
        self._server.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        conn, _ = self._server.accept()
        with conn, conn.makefile("rw", encoding="utf-8") as f:
            f.write(json.dumps({"QMP": {"version": {}, "capabilities": []}}) + "\n")
            f.flush()
            for line in f:
                command = json.loads(line)["execute"]
                self.commands.append(command)
                f.write(json.dumps({"event": "STOP", "timestamp": {}}) + "\n")
                if command == self.refuse:
                    f.write(json.dumps({"error": {"class": "GenericError", "desc": "no"}}) + "\n")
                else:
                    f.write(json.dumps({"return": {}}) + "\n")
                f.flush()
                if command == "cont":
                    self.cont_seen.set()

    def close(self) -> None:
        self._server.close()


def test_a_command_is_answered_past_the_events_before_its_reply(tmp_path: Path) -> None:
    monitor = FakeMonitor(tmp_path / "qmp.sock", refuse="stop")
    qmp = Qmp(tmp_path / "qmp.sock")
    assert qmp.execute("query-status") == {}
    with pytest.raises(QmpError, match="stop: no"):
        qmp.execute("stop")
    qmp.close()
    monitor.close()
    assert monitor.commands == ["qmp_capabilities", "query-status", "stop"]


def test_the_kicker_sends_stop_then_cont_and_ends_on_cont(tmp_path: Path) -> None:
    monitor = FakeMonitor(tmp_path / "qmp.sock")
    kicker = Kicker(200.0, tmp_path / "qmp.sock")
    kicker.start()
    assert monitor.cont_seen.wait(10)
    sent = kicker.stop()
    monitor.close()
    assert kicker.error == ""
    assert sent >= 1
    pairs = monitor.commands[1:]
    assert pairs[: 2 * sent] == ["stop", "cont"] * sent
    assert pairs[-1] == "cont", "L1 must never be left stopped"


def test_a_refused_stop_ends_the_kicker_with_why_and_l1_continued(tmp_path: Path) -> None:
    monitor = FakeMonitor(tmp_path / "qmp.sock", refuse="stop")
    kicker = Kicker(50.0, tmp_path / "qmp.sock")
    kicker.start()
    assert monitor.cont_seen.wait(10)
    assert kicker.stop() == 0
    monitor.close()
    assert "stop: no" in kicker.error
    assert monitor.commands == ["qmp_capabilities", "stop", "cont"]


def test_no_monitor_is_an_error_not_a_crash(tmp_path: Path) -> None:
    kicker = Kicker(10.0, tmp_path / "absent.sock")
    kicker.start()
    assert kicker.stop() == 0
    assert kicker.error.startswith(("FileNotFoundError", "ConnectionRefusedError"))
    with pytest.raises(ValueError):
        Kicker(0)
