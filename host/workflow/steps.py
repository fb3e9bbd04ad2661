"""A tiny step engine: run steps in order, journal each, undo the done ones on failure.

Every step that changes something is written to the journal as ``started`` *before* it acts,
so a coordinator killed in the middle leaves a record of what may have happened, for a
person (``ptmig workflows``); ``ptmig recover`` does not replay it but decides from where
the VM runs (host/workflow/recovery.py).  Compensations run in reverse order, each
journaled too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from host.logfields import log_fields
from host.workflow.model import Event, PhaseTiming

log = logging.getLogger(__name__)


class JournalLike(Protocol):
    def record(
        self, workflow_id: str, step_name: str, status: str, data: dict[str, Any]
    ) -> None: ...


@dataclass
class Step:
    name: str
    action: Callable[[], dict[str, Any] | None]
    #: Undoes the action; None for steps that change nothing or cannot be undone.
    compensation: Callable[[], None] | None = None


@dataclass
class StepRunner:
    workflow_id: str
    journal: JournalLike
    on_event: Callable[[Event], None]
    timings: list[PhaseTiming] = field(default_factory=list)
    #: The step whose end moves the VM: from its "done" on, every event says ``moved``.
    moving_step: str = ""
    moved: bool = False
    _done: list[Step] = field(default_factory=list)

    def emit(
        self, phase: str, state: str, message: str = "", fraction: float | None = None
    ) -> None:
        # One log line per event too: ptmigd's journal tells the workflow without a client.
        with log_fields(phase=phase):
            log.log(logging.DEBUG if state == "progress" else logging.INFO, "%s %s", state, message)
        try:
            self.on_event(
                Event(self.workflow_id, phase, state, message, fraction, moved=self.moved)
            )
        except Exception:  # a broken listener must not break a migration
            log.exception("event listener failed")

    def run(self, step: Step) -> dict[str, Any]:
        """Run *step*.  A step that acts on several teams may fail half-way, so its
        compensation is owed from the moment it starts; compensations undo only what
        their step records as done."""
        self.journal.record(self.workflow_id, step.name, "started", {})
        self.emit(step.name, "started")
        self._done.append(step)
        started_at = time.time()
        t0 = time.monotonic()
        try:
            with log_fields(phase=step.name):
                data = step.action() or {}
        except Exception as exc:
            self.journal.record(self.workflow_id, step.name, "failed", {"error": str(exc)})
            self.emit(step.name, "failed", str(exc))
            raise
        seconds = time.monotonic() - t0
        self.timings.append(
            PhaseTiming(step.name, round(seconds, 3), data.get("detail", ""), started_at)
        )
        self.journal.record(self.workflow_id, step.name, "done", data)
        if step.name == self.moving_step:
            self.moved = True
        self.emit(step.name, "done", data.get("detail", ""))
        return data

    def forget_compensations(self) -> None:
        """Past the point of no return (the VM has moved): nothing before can be undone."""
        self.moved = True
        self._done.clear()

    def compensate(self) -> list[str]:
        """Undo done steps in reverse order; returns the errors of compensations that failed."""
        errors = []
        for step in reversed(self._done):
            if step.compensation is None:
                continue
            self.journal.record(self.workflow_id, step.name, "compensating", {})
            self.emit(step.name, "compensating")
            try:
                with log_fields(phase=f"{step.name}-undo"):
                    step.compensation()
            except Exception as exc:
                # Expected (a device that is not free, a guest that does not answer): one
                # line; the traceback only for a debugging run.
                log.error("compensation of %s failed: %s", step.name, exc)
                log.debug("compensation of %s failed", step.name, exc_info=True)
                errors.append(f"{step.name}: {exc}")
                self.journal.record(
                    self.workflow_id, step.name, "failed", {"error": f"compensation: {exc}"}
                )
                continue
            self.journal.record(self.workflow_id, step.name, "compensated", {})
            self.emit(step.name, "compensated")
        self._done.clear()
        return errors
