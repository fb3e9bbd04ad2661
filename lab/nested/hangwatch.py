"""Watch L2 during a nested test, and end the L2 hang as soon as it is certain.

The L2 hang (docs/lab.md, "The frame read") leaves L2 spinning in its kernel with
interrupts off; a test that meets it waits out its own timeouts (7 min in a CI run of
2026-12-06) before its report says what happened.  :class:`HangWatch` samples L2's vCPU
from L1's libvirt alone (the console may be in the test's use) and, once
:func:`~lab.nested.vlab.is_spinning` holds, keeps the report and destroys L2: the test
fails at once, its report is the watch's, and the next test boots L2 again.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from lab.nested.vlab import SPIN_PERIOD_S, SPIN_SAMPLES, SpinSample, is_spinning

log = logging.getLogger(__name__)


class Watched(Protocol):
    """What the watch needs of the lab (:class:`~lab.nested.vlab.VfioLab`)."""

    def spin_sample(self) -> SpinSample | None: ...

    def spin_report(self, samples: list[SpinSample]) -> str: ...

    def destroy_guest(self) -> None: ...


class HangWatch:
    """Samples *lab*'s L2 every *period* seconds in a thread until :meth:`stop`."""

    def __init__(self, lab: Watched, period: float = SPIN_PERIOD_S) -> None:
        self.lab = lab
        self.period = period
        #: The L2 hang's report once the watch found it (then L2 was destroyed).
        self.report: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="L2 hang watch", daemon=True)

    def start(self) -> HangWatch:
        self._thread.start()
        return self

    def stop(self) -> str | None:
        """End the watch; the L2 hang's report if it found one."""
        self._stop.set()
        self._thread.join()
        return self.report

    def _run(self) -> None:
        samples: list[SpinSample] = []
        while not self._stop.wait(self.period):
            try:
                sample = self.lab.spin_sample()
            except Exception as exc:  # a watch must not take the test down with it
                log.debug("L2 hang watch: no sample: %s", exc)
                sample = None
            if sample is None:  # moving, stopped or unreadable: a spin starts again
                samples.clear()
                continue
            samples = [*samples, sample][-SPIN_SAMPLES:]
            if not is_spinning(samples):
                continue
            try:
                self.report = self.lab.spin_report(samples)
            except Exception as exc:  # the samples alone still say it
                self.report = f"(the full report failed: {exc})"
            log.warning("the L2 hang: L2 spins with interrupts off; destroying it")
            try:
                self.lab.destroy_guest()
            except Exception as exc:
                log.error("L2 hang watch: L2 could not be destroyed: %s", exc)
            return
