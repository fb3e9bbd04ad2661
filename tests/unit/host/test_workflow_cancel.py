"""Cancel at each phase, and the lease that keeps one workflow per domain, over the fakes.

A cancel is asked the way another process asks it: through a second Journal on the same
file (``ptmig cancel`` in another process does exactly that).  Each case ends with what a
user would check: where the VM runs, where each team's traffic runs, that the domain is
as before (a rollback) and that the journal has no open workflow and the domain no lease.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from workflow_fakes import POOL_SLOTS, VM1, A, B, Events, World, crash, crash_in_child

from host.domain.domain_xml import parse_domain
from host.domain.lease import Lease, format_lease, lease_from_domain_xml
from host.workflow.coordinator import NothingToCancel
from host.workflow.journal import Journal
from host.workflow.lease import LEASE_NS, LEASE_PREFIX, DomainLease, Holder, LeaseHeld, is_free
from host.workflow.model import CancelResult, MigrationReport, MigrationRequest, Outcome

REQUEST = MigrationRequest("vm1", A, B)
ON_PRIMARY = {"lan": "primary", "wan": "primary"}
A_TAPS = {tap for tap, _ in POOL_SLOTS[A]}


def assert_rolled_back(
    world: World, journal: Journal, before: dict[str, Any], *, unplugged: bool = False
) -> None:
    """On the source, every team on a primary of the source's pool, no lease, nothing
    open; with nothing unplugged yet, the domain exactly as before (a rollback that
    re-plugged has new aliases and may have other devices of the pool)."""
    assert world.running_on("vm1") == [A]
    assert world.modes("vm1") == ON_PRIMARY
    assert journal.open_workflows() == []
    assert lease_from_domain_xml(world.live_xml("vm1", A)) is None
    if not unplugged:
        assert world.snapshot() == before
        return
    taps = world.active_taps("vm1")
    assert set(taps.values()) <= A_TAPS and len(set(taps.values())) == 2, taps
    info = parse_domain(world.live_xml("vm1", A))
    assert info.teams is not None
    recorded = {t.primary.tap for t in info.teams.teams if t.primary is not None}
    assert recorded == set(taps.values())


@pytest.mark.parametrize("phase", ["preflight", "switch", "unplug"])
def test_cancel_from_another_journal_connection_rolls_back_at(
    world: World, journal: Journal, journal_path: Path, phase: str
) -> None:
    before = world.snapshot()
    answers: list[CancelResult] = []

    def cancel_elsewhere() -> None:
        with Journal(journal_path) as other:
            answers.append(world.coordinator(other).cancel("vm1", wait=0))

    events = Events({(phase, "started"): cancel_elsewhere})
    report = world.coordinator(journal).migrate(REQUEST, events)

    assert (report.outcome, report.cancelled) == (Outcome.ROLLED_BACK, True), report.error
    assert "cancelled (ptmig cancel (pid" in report.error
    assert (answers[0].accepted, answers[0].phase, answers[0].ended) == (True, phase, False)
    assert "migrate" not in events.of("started")
    assert_rolled_back(world, journal, before, unplugged=phase == "unplug")
    rows = [(s.name, str(s.status)) for s in journal.steps(report.workflow_id)]
    assert ("cancel", "done") in rows


def test_cancel_during_the_migration_job_aborts_it_and_rolls_back(
    world: World, journal: Journal, journal_path: Path
) -> None:
    world.migration_job_s = 20.0
    before = world.snapshot()
    reports: list[MigrationReport] = []
    runner = threading.Thread(
        target=lambda: reports.append(world.coordinator(journal).migrate(REQUEST, Events()))
    )
    runner.start()
    assert world.job_started.wait(10), "the migration job never started"
    assert world.hosts[A].domains[VM1.uuid].job_running
    t0 = time.monotonic()
    with Journal(journal_path) as other:
        answer = world.coordinator(other).cancel("vm1", requested_by="the test", wait=15)
    runner.join()
    assert time.monotonic() - t0 < 5  # the job was aborted, not waited out
    assert ("abort_job" in [c.method for c in world.calls]) and reports
    report = reports[0]
    assert (report.outcome, report.cancelled) == (Outcome.ROLLED_BACK, True)
    assert report.error.startswith("cancelled (the test): ")
    assert (answer.accepted, answer.phase, answer.ended, answer.cancelled) == (
        True,
        "migrate",
        True,
        True,
    )
    assert answer.outcome is Outcome.ROLLED_BACK and "with its teams as before" in answer.message
    assert_rolled_back(world, journal, before, unplugged=True)


def test_a_cancel_before_the_job_started_is_aborted_once_it_runs(
    world: World, journal: Journal
) -> None:
    """The cancel comes in the instant between the last check and libvirt's job: the
    watcher keeps asking libvirt to abort until the job is there."""
    world.migration_job_s = 20.0
    asked = threading.Event()
    events = Events({("migrate", "started"): asked.set})  # after the check between steps
    report = world.coordinator(journal).migrate(
        REQUEST, events, lambda: "SIGINT" if asked.is_set() else ""
    )
    assert (report.outcome, report.cancelled) == (Outcome.ROLLED_BACK, True)
    assert world.running_on("vm1") == [A] and world.modes("vm1") == ON_PRIMARY


def test_an_interrupt_in_this_process_cancels_like_ptmig_cancel(
    world: World, journal: Journal
) -> None:
    """SIGINT/SIGTERM on ``ptmig migrate`` come as *interrupted* (host/cli.py)."""
    before = world.snapshot()
    signalled = threading.Event()
    events = Events({("switch", "done"): signalled.set})
    report = world.coordinator(journal).migrate(
        REQUEST, events, lambda: "SIGTERM" if signalled.is_set() else ""
    )
    assert (report.outcome, report.cancelled) == (Outcome.ROLLED_BACK, True)
    assert report.error == "cancelled (SIGTERM) before unplug"
    assert events.of("compensated") == ["switch"]
    assert_rolled_back(world, journal, before)


def test_after_the_point_of_no_return_cancel_says_the_bind_will_finish(
    world: World, journal: Journal, journal_path: Path
) -> None:
    answers: list[CancelResult] = []

    def cancel_elsewhere() -> None:
        with Journal(journal_path) as other:
            answers.append(world.coordinator(other).cancel("vm1", wait=0))

    report = world.coordinator(journal).migrate(
        REQUEST, Events({("bind", "started"): cancel_elsewhere})
    )
    assert (report.outcome, report.cancelled) == (Outcome.DONE, False)
    assert world.running_on("vm1") == [B] and world.modes("vm1") == ON_PRIMARY
    (answer,) = answers
    assert (answer.accepted, answer.phase) == (False, "bind")
    assert "too late to cancel: vm1 has moved to fake://b; the bind will finish" in answer.message
    assert journal.cancel_request(report.workflow_id) is None  # nothing was asked
    assert journal.open_workflows() == []
    assert lease_from_domain_xml(world.live_xml("vm1", B)) is None


def test_the_destination_dropping_the_coordinator_at_bind_leaves_no_lease_behind(
    world: World, journal: Journal
) -> None:
    """The destination's libvirtd ends the coordinator's connections once the VM has
    moved (restarted, or it closed the client): the bind cannot run, done-degraded.  The
    lease is given back over a new connection, so the same process's repair (ptmigd's
    reconciler) is not refused until it expires."""
    report = world.coordinator(journal).migrate(
        REQUEST, Events({("bind", "started"): lambda: world.drop_connections(B)})
    )
    assert report.outcome == Outcome.DONE_DEGRADED
    assert "after the migration" in (report.error or ""), report.error
    assert world.running_on("vm1") == [B]
    assert journal.open_workflows() == []
    assert lease_from_domain_xml(world.live_xml("vm1", B)) is None
    (repaired,) = world.coordinator(journal).reconcile(B)
    assert not repaired.error and repaired.teams == ON_PRIMARY, repaired
    assert world.modes("vm1") == ON_PRIMARY


def test_cancel_without_a_running_workflow_is_an_error_that_changes_nothing(
    world: World, journal: Journal
) -> None:
    before = world.snapshot()
    with pytest.raises(NothingToCancel, match="vm1 has no running workflow in journal"):
        world.coordinator(journal).cancel("vm1")
    done = world.coordinator(journal).migrate(REQUEST, Events())
    with pytest.raises(NothingToCancel, match="no running workflow"):
        world.coordinator(journal).cancel("vm1")
    assert journal.cancel_request(done.workflow_id) is None
    assert world.snapshot() != before  # (migrated) but the cancel itself touched nothing
    assert [c for c in world.calls if c.method == "abort_job"] == []


def test_cancel_of_a_workflow_whose_coordinator_died_points_to_recover(
    world: World, journal: Journal, journal_path: Path
) -> None:
    crash_in_child(
        world,
        journal_path,
        lambda c: c.migrate(REQUEST, Events({("unplug", "started"): crash})),
    )
    (left,) = journal.open_workflows()
    with pytest.raises(NothingToCancel, match="run 'ptmig recover'"):
        world.coordinator(journal).cancel("vm1")
    assert journal.cancel_request(left.id) is None
    # The dead coordinator's lease on this machine does not block recovery.
    (result,) = world.coordinator(journal).recover()
    assert result.outcome is Outcome.ROLLED_BACK, result
    assert lease_from_domain_xml(world.live_xml("vm1", A)) is None


# -- one workflow per domain across coordinators (separate journals) ---------------------


def test_a_second_coordinator_with_its_own_journal_is_refused_by_the_lease(
    world: World, journal: Journal, tmp_path: Path
) -> None:
    refused: list[BaseException] = []

    def second_coordinator() -> None:
        with Journal(tmp_path / "other-host.sqlite") as other:
            with pytest.raises(LeaseHeld) as raised:
                world.coordinator(other).migrate(REQUEST, Events())
            refused.append(raised.value)
            assert [w.outcome for w in other.recent()] == ["refused"]
            assert other.open_workflows() == []
            with pytest.raises(LeaseHeld):
                world.coordinator(other).failover(A, "vm1", to="standby")  # type: ignore[arg-type]

    events = Events({("switch", "started"): second_coordinator})
    report = world.coordinator(journal).migrate(REQUEST, events)
    assert report.outcome is Outcome.DONE
    assert "held by migrate workflow" in str(refused[0])
    assert world.modes("vm1") == ON_PRIMARY
    assert lease_from_domain_xml(world.live_xml("vm1", B)) is None


def test_the_reconciler_of_another_coordinator_leaves_a_leased_domain_alone(
    world: World, journal: Journal, tmp_path: Path
) -> None:
    """Right after the VM moved it is degraded on the destination: the destination's
    reconciler must not plug devices while the migrating coordinator binds."""
    repairs: list[Any] = []

    def destination_reconciler() -> None:
        with Journal(tmp_path / "hostb.sqlite") as other:
            repairs.extend(world.coordinator(other).reconcile(B))
            assert [w.outcome for w in other.recent()] == ["refused"]

    report = world.coordinator(journal).migrate(
        REQUEST, Events({("bind", "started"): destination_reconciler})
    )
    assert report.outcome is Outcome.DONE and repairs == []
    assert world.modes("vm1") == ON_PRIMARY


def _lease(**changes: Any) -> Lease:
    me = Holder.this_process()
    fields: dict[str, Any] = {
        "workflow": "w-other",
        "kind": "migrate",
        "holder": "hostb",
        "machine": "another-machine",
        "boot": "another-boot",
        "pid": 1,
        "start": None,
        "expires": time.time() + 60,
    }
    fields.update(changes)
    del me
    return Lease(**fields)


def test_a_foreign_live_lease_refuses_and_an_expired_or_dead_one_is_taken(
    world: World,
) -> None:
    hv = world.connect(A)
    dom = hv.domain("vm1")
    me = Holder.this_process()
    now = time.time()
    assert not is_free(_lease(), me, now)  # another machine: only expiry frees it
    assert is_free(_lease(expires=now - 1), me, now)
    dead = _lease(machine=me.machine, boot=me.boot, pid=2**22 + 12345)
    assert me.machine and is_free(dead, me, now)  # this machine, its holder is gone
    alive = _lease(machine=me.machine, boot=me.boot, pid=me.pid, start=me.start)
    assert not is_free(alive, me, now)
    assert is_free(_lease(machine=me.machine, boot="an-earlier-boot", pid=me.pid), me, now)

    dom.set_metadata(LEASE_NS, LEASE_PREFIX, format_lease(_lease()))
    mine = DomainLease("w-mine", "migrate", settle=0)
    with pytest.raises(LeaseHeld, match="held by migrate workflow w-other of pid 1 on hostb"):
        mine.take(dom)
    dom.set_metadata(LEASE_NS, LEASE_PREFIX, format_lease(_lease(expires=now - 1)))
    mine.take(dom)
    assert mine.is_mine(DomainLease.read(dom))
    mine.release(dom)
    assert DomainLease.read(dom) is None


def test_a_garbled_lease_is_not_taken_as_free(world: World) -> None:
    hv = world.connect(A)
    dom = hv.domain("vm1")
    dom.set_metadata(LEASE_NS, LEASE_PREFIX, "<lease workflow='w' pid='x'/>")
    with pytest.raises(LeaseHeld, match="its lease cannot be read"):
        DomainLease("w-mine", "migrate", settle=0).take(dom)


def test_two_takers_that_both_saw_it_free_end_with_one_holder(world: World) -> None:
    """Fischer's wait: both write, the later write is what both read back."""
    hv = world.connect(A)
    dom = hv.domain("vm1")
    first = DomainLease("w-1", "migrate", settle=0.2)
    second = DomainLease("w-2", "migrate", settle=0.2)
    both_read = threading.Barrier(2)
    real_read = DomainLease.read

    def read_together(dom_: Any) -> Lease | None:
        found = real_read(dom_)
        if found is None:  # the first read of each take: wait for the other's
            both_read.wait(timeout=5)
        return found

    outcomes: dict[str, str] = {}

    def take(lease: DomainLease) -> None:
        try:
            lease.take(dom)
            outcomes[lease.workflow_id] = "holds"
        except LeaseHeld:
            outcomes[lease.workflow_id] = "refused"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DomainLease, "read", staticmethod(read_together))
        threads = [
            threading.Thread(target=take, args=(first,)),  # both read "free" (the
            threading.Thread(target=take, args=(second,)),  # barrier), then both write
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(outcomes.values()) == ["holds", "refused"], outcomes


def test_a_domain_with_a_libvirt_job_running_is_refused_at_once(world: World) -> None:
    world.hosts[A].domains[VM1.uuid].job_running = True
    hv = world.connect(A)
    with pytest.raises(LeaseHeld, match="has a libvirt job running"):
        DomainLease("w-mine", "repair", settle=0).take(hv.domain("vm1"))
    assert [c.method for c in world.calls if c.method == "set_lease"] == []


def test_a_migration_run_by_another_machine_on_a_shared_journal_is_asked_too(
    world: World, journal: Journal, journal_path: Path
) -> None:
    """Its owner's pid means nothing here (another boot id): the request is recorded for
    that machine's workflow to find, not refused as a dead coordinator's."""
    import sqlite3

    wf = journal.begin("migrate", VM1.uuid, "vm1", A, B, {})
    db = sqlite3.connect(journal_path, isolation_level=None)
    db.execute(
        "UPDATE workflows SET owner_pid = ?, owner_boot_id = 'another-machine' WHERE id = ?",
        (2**22 + 4321, wf),
    )
    db.close()
    answer = world.coordinator(journal).cancel("vm1", requested_by="hostb's operator", wait=0)
    assert (answer.accepted, answer.ended, answer.phase) == (True, False, "preflight")
    request = journal.cancel_request(wf)
    assert request is not None and request.requested_by == "hostb's operator"
