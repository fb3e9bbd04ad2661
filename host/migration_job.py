"""One outgoing migration job, as ptmig runs it: its downtime budget, the switch to
post-copy, and the progress watch that samples the job, relaxes the budget, asks QEMU
what it runs with and starts post-copy; its statistics at the end.

Kept beside the Hypervisor as nova keeps ``migration.py`` beside ``guest.py``: this
module holds the decisions and never imports libvirt; it acts on the job only through
:class:`JobControl`, which the source's ``host.hypervisor.Domain`` implements (libvirt's
flags and typed parameters, ``migration_call``, stay there, the one libvirt user).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from host.errors import PtmigError
from host.migration_options import (
    DOWNTIME_BUDGET_PASSES,
    QEMU_DOWNTIME_MS,
    TUNED_DOWNTIME_MS,
    CopyStorage,
    MigrationOptions,
    MigrationStats,
)

log = logging.getLogger(__name__)

#: How often the progress watcher samples a migration job.
JOB_POLL_S = 0.5


class JobControl(Protocol):
    """What a migration job's watcher asks of the source domain (``Domain``); each call
    raises the Hypervisor's error (a :class:`PtmigError`), which the watcher logs and
    survives (the job may be ending)."""

    @property
    def name(self) -> str: ...

    def job_stats(self) -> dict[str, Any]:
        """The running job's statistics (libvirt's jobStats); {} if none can be read."""
        ...

    def set_max_downtime(self, limit_ms: int) -> None: ...

    def start_postcopy(self) -> None: ...

    def qmp(self, command: str) -> Any:
        """A QMP command's ``return`` (libvirt-qemu's monitor passthrough)."""
        ...


@dataclass(frozen=True)
class MigrationProgress:
    """A sample of the migration job, for progress displays."""

    elapsed_ms: int
    data_processed: int
    data_total: int
    data_remaining: int
    iteration: int

    @property
    def fraction(self) -> float:
        return self.data_processed / self.data_total if self.data_total else 0.0


class PostcopyTrigger:
    """When the progress watcher switches a post-copy-enabled job to post-copy.

    None after: once the first pre-copy pass has ended (libvirt's iteration 2 began),
    as virsh's --postcopy-after-precopy.  After S seconds: then, or earlier once the job
    stalls, i.e. a pass ended with no less left to send than the pass before it.
    """

    def __init__(self, after_s: float | None) -> None:
        self.after_s = after_s
        self._iteration = 0
        self._remaining_at: dict[int, int] = {}  # pass -> bytes left when it was first seen

    def reason(self, elapsed_s: float, iteration: int, remaining: int) -> str:
        """Why to switch now, or "" to wait."""
        if iteration > self._iteration:
            self._iteration = iteration
            self._remaining_at[iteration] = remaining
        if self.after_s is None:
            return "first pass ended" if iteration >= 2 else ""
        if elapsed_s >= self.after_s:
            return f"after {self.after_s:g} s"
        now, before = self._remaining_at.get(iteration), self._remaining_at.get(iteration - 1)
        if iteration >= 3 and now is not None and before is not None and now >= before:
            return "stalled"
        return ""


class DowntimeBudget:
    """The downtime limit of one job: the operator's (fixed), libvirt's (untouched), or
    ptmig's: :data:`TUNED_DOWNTIME_MS` for :data:`DOWNTIME_BUDGET_PASSES` passes, then
    QEMU's default.  A pass is libvirt's memory_iteration (1: the first full copy)."""

    def __init__(self, operator_ms: int | None, options: MigrationOptions) -> None:
        self.budgeted = operator_ms is None and not options.libvirt_defaults
        self.start_ms = (
            operator_ms
            if operator_ms is not None
            else (TUNED_DOWNTIME_MS if self.budgeted else None)
        )
        self.relaxed_at_pass: int | None = None

    def give_up(self) -> None:
        """libvirt would not take the limit: the job runs with its defaults."""
        self.budgeted, self.start_ms = False, None

    def relax(self, iteration: int) -> int | None:
        """The limit to set now (once), or None."""
        if not self.budgeted or self.relaxed_at_pass is not None:
            return None
        if iteration <= DOWNTIME_BUDGET_PASSES:
            return None
        self.relaxed_at_pass = iteration
        return QEMU_DOWNTIME_MS


class MigrationJob:
    """The watch over one job: :meth:`begin` before libvirt's migration call (it sets the
    starting downtime limit and starts sampling in a thread), :meth:`end` after it,
    :meth:`stats` with the destination's record of the completed job."""

    def __init__(
        self,
        control: JobControl,
        options: MigrationOptions,
        max_downtime_ms: int | None = None,
        on_progress: Callable[[MigrationProgress], None] | None = None,
    ) -> None:
        self.control = control
        self.options = options
        self.budget = DowntimeBudget(max_downtime_ms, options)
        self.on_progress = on_progress
        self.seen = JobWatch(options, self.budget)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="migration-progress", daemon=True)
        self._t0 = 0.0
        self.wall_s = 0.0

    def set_start_downtime(self) -> None:
        """The budget's first limit, before the job starts.  The operator's limit is
        required (its error is raised); ptmig's own tuning is dropped if libvirt refuses."""
        if self.budget.start_ms is None:
            return
        try:
            self.control.set_max_downtime(self.budget.start_ms)
        except PtmigError as exc:
            if not self.budget.budgeted:  # the operator's limit: not without it
                raise
            # ptmig's own tuning: without it the job is libvirt's plain one
            log.warning("%s: libvirt's downtime limit kept: %s", self.control.name, exc)
            self.budget.give_up()

    def begin(self) -> None:
        """Start the clock and the watcher (the migration call comes next)."""
        self._t0 = time.monotonic()
        self._watcher.start()

    def end(self) -> None:
        """The migration call returned or raised: stop watching."""
        self._stop.set()
        self._watcher.join()
        self.wall_s = time.monotonic() - self._t0

    def entered_postcopy(self) -> None:
        """libvirt's lifecycle event: the source was suspended for post-copy."""
        self.seen.postcopy_entered_s = time.monotonic() - self._t0

    @property
    def in_postcopy(self) -> bool:
        return self.seen.postcopy_entered_s is not None

    def stats(self, completed_job: dict[str, Any]) -> MigrationStats:
        """The destination's record of the completed job ({} where it has none) and what
        the watcher saw: TLS credentials, the vCPU throttle, the switch to post-copy."""
        return self.seen.stats(self.wall_s, completed_job)

    def _watch(self) -> None:
        options, seen, budget = self.options, self.seen, self.budget
        trigger = PostcopyTrigger(options.postcopy_after_s) if options.postcopy else None
        while not self._stop.wait(JOB_POLL_S):
            info = self.control.job_stats()
            if info.get("type", 0) in (0, None):
                continue
            seen.sample(info)
            # Once memory moves: libvirt sets QEMU's capabilities and parameters just
            # before the migrate command (after the destination's prepare and any
            # storage copy).  In its own thread: the watcher must not wait on it.
            if not seen.asked_qemu and int(info.get("memory_total", 0)) > 0:
                seen.asked_qemu = True
                threading.Thread(target=self._ask_qemu, name="migration-qmp", daemon=True).start()
            relaxed = budget.relax(int(info.get("memory_iteration", 0)))
            if relaxed is not None:
                self._relax_downtime(relaxed)
            if trigger is not None and seen.postcopy_asked_s is None:
                elapsed = int(info.get("time_elapsed", 0)) / 1000 or time.monotonic() - self._t0
                reason = trigger.reason(
                    elapsed,
                    int(info.get("memory_iteration", 0)),
                    int(info.get("memory_remaining", info.get("data_remaining", 0))),
                )
                if reason:
                    self._start_postcopy(reason, time.monotonic() - self._t0)
            if self.on_progress is not None:
                self.on_progress(
                    MigrationProgress(
                        elapsed_ms=int(info.get("time_elapsed", 0)),
                        data_processed=int(info.get("data_processed", 0)),
                        data_total=int(info.get("data_total", 0)),
                        data_remaining=int(info.get("data_remaining", 0)),
                        iteration=int(info.get("memory_iteration", 0)),
                    )
                )

    def _ask_qemu(self) -> None:
        """QEMU's migration capabilities and parameters while the job runs (libvirt resets
        them when it ends): the proof that TLS, multifd, auto-converge, post-copy were on."""
        seen = self.seen
        try:
            caps = self.control.qmp("query-migrate-capabilities")
            params = self.control.qmp("query-migrate-parameters")
        except (PtmigError, ValueError, KeyError) as exc:
            log.info("%s: QEMU's migration settings not read: %s", self.control.name, exc)
            return
        if isinstance(caps, list):
            seen.capabilities = tuple(
                str(c.get("capability")) for c in caps if isinstance(c, dict) and c.get("state")
            )
        if isinstance(params, dict):
            creds = params.get("tls-creds")
            seen.tls_creds = creds if isinstance(creds, str) else ""
            channels = params.get("multifd-channels")
            seen.multifd_channels = channels if isinstance(channels, int) else None

    def _relax_downtime(self, limit_ms: int) -> None:
        try:
            self.control.set_max_downtime(limit_ms)
        except PtmigError as exc:  # the job may be ending
            log.info("relax the downtime limit: %s", exc)
            return
        log.info(
            "migration of %s: pass %s, downtime limit now %d ms",
            self.control.name,
            self.budget.relaxed_at_pass,
            limit_ms,
        )

    def _start_postcopy(self, reason: str, at_s: float) -> None:
        try:
            self.control.start_postcopy()
        except PtmigError as exc:  # the job may be ending; the next sample retries
            log.info("start post-copy (%s): %s", reason, exc)
            return
        log.info("migration of %s: post-copy asked at %.1f s (%s)", self.control.name, at_s, reason)
        self.seen.postcopy_asked_s = at_s
        self.seen.postcopy_reason = reason


class JobWatch:
    """What the progress watcher saw of one job, for its :class:`MigrationStats`."""

    def __init__(self, options: MigrationOptions, budget: DowntimeBudget) -> None:
        self.options = options
        self.budget = budget
        self.asked_qemu = False
        self.tls_creds = ""
        self.capabilities: tuple[str, ...] = ()
        self.multifd_channels: int | None = None
        self.throttle: int | None = None
        self.disk: dict[str, int] = {}
        self.postcopy_asked_s: float | None = None
        self.postcopy_entered_s: float | None = None
        self.postcopy_reason = ""

    def sample(self, info: dict[str, Any]) -> None:
        throttle = _int_or_none(info.get("auto_converge_throttle"))
        if throttle is not None:
            self.throttle = max(throttle, self.throttle or 0)
        for key in ("disk_total", "disk_processed"):
            value = _int_or_none(info.get(key))
            if value is not None:
                self.disk[key] = max(value, self.disk.get(key, 0))

    def stats(self, wall_s: float, job: dict[str, Any]) -> MigrationStats:
        o = self.options
        throttle = _int_or_none(job.get("auto_converge_throttle"))
        if self.throttle is not None:
            throttle = max(throttle or 0, self.throttle)
        copying = o.copy_storage is not CopyStorage.NONE

        def disk(key: str) -> int | None:
            # The source's samples: the destination's record of the job says 0 (its
            # statistics come in the migration cookie, without the storage mirror's).
            values = [v for v in (_int_or_none(job.get(key)), self.disk.get(key)) if v is not None]
            return max(values) if values else None

        entered = self.postcopy_entered_s is not None
        return MigrationStats(
            wall_s=wall_s,
            downtime_ms=_int_or_none(job.get("downtime")),
            elapsed_ms=_int_or_none(job.get("time_elapsed")),
            data_total=_int_or_none(job.get("data_total")),
            iterations=_int_or_none(job.get("memory_iteration")),
            tls=o.tls,
            tls_creds=self.tls_creds,
            copy_storage=o.copy_storage,
            disk_total=disk("disk_total") if copying else None,
            disk_processed=disk("disk_processed") if copying else None,
            migrate_disks=o.migrate_disks,
            bandwidth_mib_s=o.bandwidth_mib_s,
            memory_bps=_int_or_none(job.get("memory_bps")),
            auto_converge=o.auto_converge,
            auto_converge_throttle_pct=throttle if o.auto_converge else None,
            postcopy=o.postcopy,
            postcopy_started=entered,
            postcopy_started_after_s=(
                round(self.postcopy_asked_s, 3)
                if entered and self.postcopy_asked_s is not None
                else None
            ),
            postcopy_reason=self.postcopy_reason,
            parallel_connections=o.parallel_connections,
            max_downtime_ms=self.budget.start_ms,
            downtime_relaxed_at_pass=self.budget.relaxed_at_pass,
            qemu_capabilities=self.capabilities,
            multifd_channels=self.multifd_channels if o.parallel_connections else None,
        )


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None
