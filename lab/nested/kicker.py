"""Kick L1's vCPUs from L0's monitor: the L2 hang's trigger, on demand.

docs/lab.md ("The cause ...: L0's TCG delivers an injected interrupt twice"): when L0's TCG
enters L2 with an interrupt L1's KVM injected (``helper_vmrun``, ``SVM_EVTINJ_TYPE_INTR``),
it delivers it at once and leaves ``exception_index`` set to its vector.  A vCPU kicked
before L2's next #VMEXIT, by anything that is not an interrupt for it, hands that stale
index to ``x86_cpu_do_interrupt``: the vector again, as an exception, which IF does not
mask.  Hot-plugs kick every vCPU (a device's BAR or MSI-X enabled in L0 changes its
memory map: ``tcg_commit`` queues work on each vCPU); so does a ``stop`` from the monitor
(``pause_all_vcpus``).  :class:`Kicker` sends ``stop`` and ``cont`` at a steady rate, so
the window is hit far more often than hot-plugs alone hit it: a hang within minutes if
the mechanism is the cause, none if a mitigation closes the window.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

from lab.nested.l1 import qmp_socket


class QmpError(RuntimeError):
    """L0's monitor refused a command or went away."""


class Qmp:
    """A minimal QMP client on a unix socket: commands in order, events skipped."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        self._sock.connect(str(path))
        self._reader = self._sock.makefile("r", encoding="utf-8")
        self._message()  # the greeting
        self.execute("qmp_capabilities")

    def _message(self) -> dict[str, Any]:
        line = self._reader.readline()
        if not line:
            raise QmpError("L0's monitor closed the connection")
        message: dict[str, Any] = json.loads(line)
        return message

    def execute(self, command: str) -> Any:
        self._sock.sendall(json.dumps({"execute": command}).encode() + b"\n")
        while True:
            reply = self._message()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QmpError(f"{command}: {reply['error'].get('desc', reply['error'])}")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()


class Kicker:
    """``stop`` then ``cont`` on L0's monitor, *hz* times a second, in a thread."""

    def __init__(self, hz: float, path: Path | None = None) -> None:
        if hz <= 0:
            raise ValueError(f"kick rate must be positive, not {hz}")
        self.period = 1.0 / hz
        self.path = path or qmp_socket()
        self.kicks = 0
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="L0 vCPU kicker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        """End the kicks (L1 left running); the number sent."""
        self._stop.set()
        self._thread.join(30)
        return self.kicks

    def _run(self) -> None:
        try:
            qmp = Qmp(self.path)
        except (OSError, QmpError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return
        try:
            next_at = time.monotonic()
            while not self._stop.is_set():
                qmp.execute("stop")
                qmp.execute("cont")
                self.kicks += 1
                next_at += self.period
                self._stop.wait(max(0.0, next_at - time.monotonic()))
        except (OSError, QmpError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(OSError, QmpError, ValueError):  # never leave L1 stopped
                qmp.execute("cont")
            qmp.close()
