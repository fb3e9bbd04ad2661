"""``ptmig``'s live side: SIGINT and SIGTERM as a cancel while a migration or an
evacuation runs in a worker thread, and the progress bars and table drawn meanwhile."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from host.workflow.coordinator import Coordinator
    from host.workflow.model import (
        EvacuationEvent,
        EvacuationRequest,
        Event,
        MigrationRequest,
    )

R = TypeVar("R")


class MigrationInterrupt:
    """SIGINT and SIGTERM on ``ptmig migrate`` do what ``ptmig cancel`` does, and say so.

    The migration runs in a worker thread; this (main) thread only waits for it, so the
    signal is handled at once even while libvirt's migration call blocks the worker.
    The first signal asks the workflow to cancel (it aborts the job and rolls back, or,
    once the VM has moved, finishes the bind); later ones only say it is still under
    way: leaving before the workflow ends would leave it open in the journal.
    """

    def __init__(self, request: MigrationRequest) -> None:
        self.request = request
        self._reason = ""
        self._phase = ""
        self._moved = False

    def reason(self) -> str:
        return self._reason

    def seen(self, event: Event) -> None:
        self._phase = event.phase
        self._moved = self._moved or event.moved

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self._reason:
            print(self._again(name), file=sys.stderr)
            return
        self._reason = name
        print(self._first(name), file=sys.stderr, flush=True)

    def _again(self, name: str) -> str:
        return (
            f"ptmig: {name}: already cancelling ({self._reason}); waiting for the workflow "
            "to end so that it is not left open"
        )

    def _first(self, name: str) -> str:
        if self._moved:
            return (
                f"ptmig: {name}: too late to cancel: {self.request.domain} has moved to "
                f"{self.request.destination_uri}; finishing the bind"
            )
        return (
            f"ptmig: {name}: cancelling the migration of {self.request.domain}"
            f"{' at ' + self._phase if self._phase else ''}: aborting and rolling back "
            f"onto {self.request.source_uri}"
        )

    def run(self, work: Callable[[], R]) -> R:
        result: list[R] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                result.append(work())
            except BaseException as exc:
                error.append(exc)

        if threading.current_thread() is not threading.main_thread():
            target()  # signals reach the main thread only; an embedding caller's concern
        else:
            previous = {
                s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)
            }
            worker = threading.Thread(target=target, name="migrate")
            try:
                worker.start()
                while worker.is_alive():
                    worker.join(0.2)
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        if error:
            raise error[0]
        return result[0]


class EvacuationInterrupt(MigrationInterrupt):
    """SIGINT and SIGTERM on ``ptmig evacuate``: no new migration starts, the running ones
    are cancelled as ``ptmig cancel`` does (each rolls back, or finishes its bind)."""

    def __init__(self, request: EvacuationRequest) -> None:
        self.evacuation = request
        self._reason = ""

    def _again(self, name: str) -> str:
        return (
            f"ptmig: {name}: already stopping ({self._reason}); waiting for the running "
            "migrations to end so that none is left open"
        )

    def _first(self, name: str) -> str:
        return (
            f"ptmig: {name}: stopping the evacuation of {self.evacuation.source_uri}: no new "
            "migration starts; the running ones are cancelled (rolled back, or their bind "
            "finished where the VM has moved)"
        )


def evacuation_line(event: EvacuationEvent) -> str:
    where = f" -> {event.destination_uri}" if event.destination_uri else ""
    return f"{event.domain}{where}: {event.phase}: {event.state} {event.message}".rstrip()


def evacuate_with_table(
    coordinator: Coordinator, request: EvacuationRequest, interrupt: EvacuationInterrupt
) -> Any:
    """A live table, one row per domain (rich, on a terminal)."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    rows: dict[str, tuple[str, str, str]] = {}  # domain -> (destination, phase, outcome)

    def table() -> Table:
        t = Table("domain", "destination", "phase", "outcome", title=request.source_uri)
        for domain, (destination, phase, outcome) in rows.items():
            t.add_row(domain, destination, phase, outcome)
        return t

    with Live(table(), console=Console(stderr=True), refresh_per_second=4) as live:

        def on_event(event: EvacuationEvent) -> None:
            destination, phase, outcome = rows.get(event.domain, ("", "", ""))
            if event.outcome:
                outcome = event.outcome
            else:
                phase = f"{event.phase} {event.state}"
                if event.fraction is not None:
                    phase += f" {event.fraction:.0%}"
            rows[event.domain] = (event.destination_uri or destination, phase, outcome)
            live.update(table())

        return coordinator.evacuate(request, on_event, interrupt.reason)


def can_draw_progress() -> bool:
    """rich draws the bars; a host without it (it is only recommended) gets plain lines."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def migrate_with_progress_bars(
    coordinator: Coordinator, request: MigrationRequest, interrupt: MigrationInterrupt
) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        TextColumn("{task.fields[message]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as progress:
        tasks: dict[str, Any] = {}

        def on_event(event: Event) -> None:
            interrupt.seen(event)
            task = tasks.get(event.phase)
            if task is None:
                task = tasks[event.phase] = progress.add_task(event.phase, total=1.0, message="")
            if event.state == "done":
                progress.update(task, completed=1.0, message=event.message or "done")
            elif event.fraction is not None:
                progress.update(task, completed=event.fraction, message=event.message)
            else:
                progress.update(task, message=f"{event.state} {event.message}".strip())

        return coordinator.migrate(request, on_event, interrupt.reason)
