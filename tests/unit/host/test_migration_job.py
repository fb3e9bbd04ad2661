"""host/migration_job.py's watch over one job, on a scripted source domain (no libvirt):
it relaxes the downtime budget, switches to post-copy and reports progress as the job's
statistics say, and survives the calls the source refuses."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from host import migration_job
from host.hypervisor import HypervisorError
from host.migration_job import MigrationJob, MigrationProgress
from host.migration_options import (
    DOWNTIME_BUDGET_PASSES,
    QEMU_DOWNTIME_MS,
    TUNED_DOWNTIME_MS,
    MigrationOptions,
)


class ScriptedSource:
    """A source domain whose job goes through the passes *script* lists, one per sample."""

    name = "vm1"

    def __init__(self, script: list[dict[str, Any]], refuse: set[str] = frozenset()) -> None:
        self.script = list(script)
        self.refuse = refuse
        self.downtimes: list[int] = []
        self.postcopy_started = 0
        self.done = threading.Event()

    def job_stats(self) -> dict[str, Any]:
        if not self.script:
            self.done.set()
            return {}
        return self.script.pop(0)

    def set_max_downtime(self, limit_ms: int) -> None:
        if "downtime" in self.refuse:
            raise HypervisorError("set max downtime: the job is ending")
        self.downtimes.append(limit_ms)

    def start_postcopy(self) -> None:
        if "postcopy" in self.refuse:
            raise HypervisorError("start post-copy: not now")
        self.postcopy_started += 1

    def qmp(self, command: str) -> Any:
        if command == "query-migrate-capabilities":
            return [{"capability": "postcopy-ram", "state": True}, {"capability": "x"}]
        return {"tls-creds": "", "multifd-channels": 2}


def sample(iteration: int, remaining: int = 100, total: int = 1000) -> dict[str, Any]:
    return {
        "type": 2,
        "time_elapsed": 100 * iteration,
        "memory_total": total,
        "memory_iteration": iteration,
        "memory_remaining": remaining,
        "data_total": total,
        "data_processed": total - remaining,
        "data_remaining": remaining,
    }


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(migration_job, "JOB_POLL_S", 0.001)


def run(job: MigrationJob, source: ScriptedSource) -> None:
    job.set_start_downtime()
    job.begin()
    assert source.done.wait(5)
    job.end()


def test_the_budget_is_set_then_relaxed_after_its_passes_and_progress_is_reported() -> None:
    passes = DOWNTIME_BUDGET_PASSES + 2
    source = ScriptedSource([sample(i) for i in range(1, passes + 1)])
    seen: list[MigrationProgress] = []
    job = MigrationJob(source, MigrationOptions(), on_progress=seen.append)
    run(job, source)

    assert source.downtimes == [TUNED_DOWNTIME_MS, QEMU_DOWNTIME_MS]
    assert job.budget.relaxed_at_pass == DOWNTIME_BUDGET_PASSES + 1
    assert [p.iteration for p in seen] == list(range(1, passes + 1))
    assert seen[0].fraction == pytest.approx(0.9)
    stats = job.stats({"downtime": 7})
    assert stats.downtime_ms == 7 and stats.max_downtime_ms == TUNED_DOWNTIME_MS


def test_postcopy_starts_once_the_first_pass_ended() -> None:
    source = ScriptedSource([sample(1), sample(2), sample(3)])
    job = MigrationJob(source, MigrationOptions(postcopy=True))
    run(job, source)

    assert source.postcopy_started == 1
    assert job.seen.postcopy_reason == "first pass ended"
    assert job.seen.capabilities == ("postcopy-ram",)


def test_a_refused_ptmig_budget_leaves_libvirts_limit_and_the_job_goes_on() -> None:
    source = ScriptedSource([sample(1), sample(2)], refuse={"downtime", "postcopy"})
    job = MigrationJob(source, MigrationOptions(postcopy=True))
    run(job, source)

    assert job.budget.start_ms is None and source.downtimes == []
    assert source.postcopy_started == 0 and job.seen.postcopy_asked_s is None


def test_the_operators_downtime_limit_is_required() -> None:
    source = ScriptedSource([], refuse={"downtime"})
    job = MigrationJob(source, MigrationOptions(), max_downtime_ms=100)
    with pytest.raises(HypervisorError, match="set max downtime"):
        job.set_start_downtime()
