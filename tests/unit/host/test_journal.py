"""The workflow journal: round trips, one open workflow per domain, crash survival."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from workflow_fakes import latest_steps

from host.workflow.journal import (
    SCHEMA_VERSION,
    Journal,
    JournalDataError,
    JournalError,
    JournalUnwritable,
    StepStatus,
    UnknownWorkflow,
    WorkflowClosed,
    WorkflowConflict,
    WorkflowKind,
    WorkflowState,
    process_alive,
)

REPO = Path(__file__).resolve().parents[3]
DOMAIN = "8d3c1f52-5f0e-4a53-9a55-6c1d1c0f2b11"
SRC, DST = "qemu+ssh://a/system", "qemu+ssh://b/system"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite"


@pytest.fixture
def journal(path: Path) -> Iterator[Journal]:
    with Journal(path) as j:
        yield j


def begin(journal: Journal, domain: str = DOMAIN, **request: object) -> str:
    return journal.begin(
        "migrate", domain, "vm1", SRC, DST, {"domain": "vm1", "unsafe": False, **request}
    )


# -- files and settings ----------------------------------------------------------------


def test_creates_private_directory_and_file_in_wal_mode(journal: Journal, path: Path) -> None:
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"workflows", "steps"} <= tables
    finally:
        db.close()
    assert journal._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_reopening_keeps_data_and_schema(path: Path) -> None:
    with Journal(path) as j:
        wid = begin(j)
        j.record(wid, "switch", "started", {"team": "t0"})
    with Journal(path) as j:
        record = j.get(wid)
        assert record is not None and record.is_open
        assert [s.name for s in j.steps(wid)] == ["switch"]


def test_corrupt_file_is_a_journal_error_naming_the_path(path: Path) -> None:
    path.parent.mkdir(mode=0o700)
    path.write_bytes(b"this is not an sqlite database, not at all" * 100)
    with pytest.raises(JournalError, match=str(path)):
        Journal(path)


def test_unreadable_location_is_a_journal_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(JournalError, match="cannot create"):
        Journal(blocker / "journal.sqlite")


def test_a_filesystem_too_full_for_a_workflow_refuses_begin_and_writes_nothing(
    path: Path,
) -> None:
    """Less free space than a workflow needs (here: more than any disk has) is refused
    at begin, before a row is written, in words that say what to do."""
    fs = os.statvfs(path.parent.parent)
    free = fs.f_bavail * fs.f_frsize
    with Journal(path, min_free_bytes=free + 2**40) as journal:
        with pytest.raises(JournalUnwritable) as refused:
            begin(journal)
        assert refused.value.code == "RESOURCE_EXHAUSTED"
        assert "its filesystem is full" in str(refused.value)
        assert "nothing was changed" in str(refused.value)
        assert journal.recent() == [] and journal.open_workflows() == []
    with Journal(path) as journal:  # with room, the same journal takes it
        begin(journal)
        assert len(journal.open_workflows()) == 1


def test_newer_schema_is_refused(path: Path) -> None:
    Journal(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.commit()
    db.close()
    with pytest.raises(JournalError, match="newer"):
        Journal(path)


# -- round trips -----------------------------------------------------------------------


def test_begin_record_finish_round_trip(journal: Journal) -> None:
    wid = begin(journal, max_downtime_ms=300)
    assert uuid.UUID(wid).version == 4
    record = journal.get(wid)
    assert record is not None
    assert record.kind is WorkflowKind.MIGRATE
    assert (record.domain_uuid, record.domain_name) == (DOMAIN, "vm1")
    assert (record.source_uri, record.destination_uri) == (SRC, DST)
    assert record.state is WorkflowState.OPEN and record.outcome is None
    assert record.request == {"domain": "vm1", "unsafe": False, "max_downtime_ms": 300}
    assert record.owner_pid == os.getpid()
    assert journal.is_owner_alive(record)

    journal.record(wid, "preflight", StepStatus.STARTED, {})
    journal.record(wid, "preflight", "done", {"teams": ["t0", "t1"]})
    journal.record(wid, "switch", "started", {"team": "t0", "nested": {"a": [1, 2.5, None]}})
    steps = journal.steps(wid)
    assert [(s.seq, s.name, s.status) for s in steps] == [
        (1, "preflight", StepStatus.STARTED),
        (2, "preflight", StepStatus.DONE),
        (3, "switch", StepStatus.STARTED),
    ]
    assert steps[2].data == {"team": "t0", "nested": {"a": [1, 2.5, None]}}
    last = latest_steps(journal, wid)
    assert list(last) == ["preflight", "switch"]
    assert last["preflight"].status is StepStatus.DONE
    assert last["preflight"].data == {"teams": ["t0", "t1"]}

    journal.finish(wid, "done", {"outcome": "done", "phases": [{"name": "x", "seconds": 1.5}]})
    closed = journal.get(wid)
    assert closed is not None
    assert closed.state is WorkflowState.CLOSED and closed.outcome == "done"
    assert closed.report == {"outcome": "done", "phases": [{"name": "x", "seconds": 1.5}]}
    assert closed.updated >= closed.created
    assert journal.open_workflows() == []
    assert closed.to_dict()["state"] == "closed"


def test_closed_workflow_takes_no_more_steps(journal: Journal) -> None:
    wid = begin(journal)
    journal.finish(wid, "rolled-back", {})
    with pytest.raises(WorkflowClosed):
        journal.record(wid, "switch", "started", {})
    with pytest.raises(WorkflowClosed):
        journal.finish(wid, "done", {})


def test_unknown_workflow(journal: Journal) -> None:
    assert journal.get("nope") is None
    assert journal.steps("nope") == []
    with pytest.raises(UnknownWorkflow):
        journal.record("nope", "switch", "started", {})
    with pytest.raises(UnknownWorkflow):
        journal.finish("nope", "done", {})


def test_recent_is_newest_first_and_limited(journal: Journal) -> None:
    ids = []
    for n in range(5):
        wid = begin(journal, domain=f"dom-{n}")
        ids.append(wid)
        if n % 2:
            journal.finish(wid, "done", {})
    assert [r.id for r in journal.recent(3)] == ids[::-1][:3]
    assert [r.id for r in journal.open_workflows()] == [ids[0], ids[2], ids[4]]


def test_bad_kind_and_status_are_refused(journal: Journal) -> None:
    with pytest.raises(JournalDataError, match="workflow kind"):
        journal.begin("teleport", DOMAIN, "vm1", SRC, DST, {})
    wid = begin(journal)
    with pytest.raises(JournalDataError, match="step status"):
        journal.record(wid, "switch", "half-done", {})


# -- JSON ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"x": {1, 2}}, r"data\['x'\]: a set is not JSON"),
        ({"x": [1, object()]}, r"data\['x'\]\[1\]: a object is not JSON"),
        ({"x": float("nan")}, "not a JSON number"),
        ({"x": {3: "three"}}, "JSON keys are strings"),
        ({"x": b"bytes"}, "a bytes is not JSON"),
    ],
)
def test_non_json_step_data_is_refused(
    journal: Journal, data: dict[str, object], message: str
) -> None:
    wid = begin(journal)
    with pytest.raises(JournalDataError, match=message):
        journal.record(wid, "switch", "started", data)
    assert journal.steps(wid) == []  # nothing half-written


def test_non_json_request_and_report_are_refused(journal: Journal) -> None:
    with pytest.raises(JournalDataError, match="request"):
        journal.begin("migrate", DOMAIN, "vm1", SRC, DST, {"when": object()})
    assert journal.open_workflows() == []
    wid = begin(journal)
    with pytest.raises(JournalDataError, match="report"):
        journal.finish(wid, "done", {"at": Path("/")})
    record = journal.get(wid)
    assert record is not None and record.is_open
    with pytest.raises(JournalDataError, match="JSON object"):
        journal.finish(wid, "done", ["not", "a", "dict"])  # type: ignore[arg-type]


# -- one open workflow per domain ------------------------------------------------------


def test_second_begin_for_the_same_domain_conflicts(journal: Journal, path: Path) -> None:
    first = begin(journal)
    with pytest.raises(WorkflowConflict) as caught:
        begin(journal)
    assert first in str(caught.value) and "still running" in str(caught.value)
    assert caught.value.open_workflow.id == first and caught.value.owner_alive

    with Journal(path) as other:  # another process's view of the same file
        with pytest.raises(WorkflowConflict, match=first):
            begin(other)
        begin(other, domain="another-domain")  # other domains are not affected
    assert journal.open_workflows()[0].id == first

    journal.finish(first, "done", {})
    second = begin(journal)
    assert second != first


def test_concurrent_begins_admit_exactly_one(path: Path) -> None:
    Journal(path).close()
    results: list[str] = []
    conflicts: list[WorkflowConflict] = []
    barrier = threading.Barrier(8)

    def attempt() -> None:
        with Journal(path) as j:
            barrier.wait()
            try:
                results.append(begin(j))
            except WorkflowConflict as exc:
                conflicts.append(exc)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 1 and len(conflicts) == 7
    assert all(c.open_workflow.id == results[0] for c in conflicts)


def test_threads_share_one_journal(journal: Journal) -> None:
    wid = begin(journal)

    def work(n: int) -> None:
        for i in range(20):
            journal.record(wid, f"step-{n}", "started", {"i": i})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    steps = journal.steps(wid)
    assert [s.seq for s in steps] == list(range(1, 81))
    assert all(last.data == {"i": 19} for last in latest_steps(journal, wid).values())


# -- crashes and owners ----------------------------------------------------------------

CRASHER = """
import sys, time
from host.workflow.journal import Journal
j = Journal(sys.argv[1])
wid = j.begin("migrate", sys.argv[2], "vm1", "src", "dst", {"domain": "vm1"})
j.record(wid, "preflight", "done", {})
j.record(wid, "switch", "started", {"team": "t0"})
print(wid, flush=True)
time.sleep(600)
"""


def test_sigkilled_coordinator_leaves_an_open_workflow_with_its_step(
    journal: Journal, path: Path
) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASHER, str(path), DOMAIN],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        wid = proc.stdout.readline().strip()
        assert wid, "the crasher printed no workflow id"
        (running,) = journal.open_workflows()
        assert running.owner_pid == proc.pid
        assert journal.is_owner_alive(running)
        with pytest.raises(WorkflowConflict, match="still running"):
            begin(journal)
        with pytest.raises(WorkflowConflict):
            journal.adopt(wid)  # its owner is alive: recovery must not take it over
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    with Journal(path) as after:  # what `ptmig recover` sees
        (left,) = after.open_workflows()
        assert left.id == wid and left.domain_uuid == DOMAIN
        assert not after.is_owner_alive(left)
        last = latest_steps(after, wid)
        assert list(last) == ["preflight", "switch"]
        assert last["switch"].status is StepStatus.STARTED
        assert last["switch"].data == {"team": "t0"}
        with pytest.raises(WorkflowConflict, match="ptmig recover") as caught:
            begin(after)
        assert not caught.value.owner_alive

        adopted = after.adopt(wid)
        assert adopted.owner_pid == os.getpid() and after.is_owner_alive(adopted)
        after.record(wid, "switch", "compensated", {})
        after.finish(wid, "rolled-back", {"outcome": "rolled-back"})
        assert after.open_workflows() == []
        begin(after)


def test_adopting_own_and_closed_workflows(journal: Journal, path: Path) -> None:
    wid = begin(journal)
    with Journal(path) as other, pytest.raises(WorkflowConflict):
        other.adopt(wid)  # this very process runs it: not to be taken over (ptmigd)
    journal.finish(wid, "done", {})
    with pytest.raises(WorkflowClosed):
        journal.adopt(wid)


def test_recycled_pid_is_not_the_owner(journal: Journal) -> None:
    record = journal.get(begin(journal))
    assert record is not None and journal.is_owner_alive(record)
    assert record.owner_start is not None
    recycled = dataclasses.replace(record, owner_start=record.owner_start + 1)
    assert not journal.is_owner_alive(recycled)
    rebooted = dataclasses.replace(record, owner_boot_id="00000000-0000-0000-0000-000000000000")
    assert not journal.is_owner_alive(rebooted)
    assert not journal.is_owner_alive(dataclasses.replace(record, owner_pid=0))


def test_zombie_is_not_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        for _ in range(200):  # exited but not reaped: a zombie
            stat_text = Path(f"/proc/{proc.pid}/stat").read_text()
            if stat_text.rpartition(")")[2].split()[0] == "Z":
                break
            threading.Event().wait(0.01)
        assert not process_alive(proc.pid, None, None)
    finally:
        proc.wait()


# -- property --------------------------------------------------------------------------

STEP_NAMES = st.sampled_from(["preflight", "switch", "detach", "migrate", "attach", "bind"])
STATUSES = st.sampled_from(list(StepStatus))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(STEP_NAMES, STATUSES, st.integers(-5, 5)), max_size=30))
def test_last_status_is_the_last_record_per_step(
    calls: list[tuple[str, StepStatus, int]],
) -> None:
    with tempfile.TemporaryDirectory() as tmp, Journal(Path(tmp) / "j.sqlite") as journal:
        wid = begin(journal)
        expected: dict[str, tuple[StepStatus, int]] = {}
        for name, status, n in calls:
            journal.record(wid, name, status, {"n": n})
            expected[name] = (status, n)
        last = latest_steps(journal, wid)
        assert list(last) == list(dict.fromkeys(name for name, _, _ in calls))
        assert {k: (v.status, v.data["n"]) for k, v in last.items()} == expected
        assert len(journal.steps(wid)) == len(calls)


def test_many_processes_opening_a_new_journal_at_once(tmp_path: Path) -> None:
    """Coordinators starting together on a fresh journal: the WAL switch must not fail."""
    import threading

    for round_ in range(10):
        path = tmp_path / f"j{round_}" / "journal.sqlite"
        errors: list[BaseException] = []
        barrier = threading.Barrier(6)

        def open_it(
            path: Path = path,
            errors: list[BaseException] = errors,
            barrier: threading.Barrier = barrier,
        ) -> None:
            barrier.wait()
            try:
                with Journal(path) as j:
                    j.open_workflows()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not errors, errors


def test_a_version_1_journal_is_upgraded_keeping_its_workflows_and_steps(
    tmp_path: Path,
) -> None:
    from host.workflow.journal_schema import MIGRATIONS

    path = tmp_path / "v1.sqlite"
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(MIGRATIONS[0])
    db.execute(
        "INSERT INTO workflows VALUES ('w1', 'migrate', 'u1', 'vm1', 'a', 'b', 'open', NULL, "
        "1.0, 2.0, 1, NULL, NULL, '{}', NULL)"
    )
    db.execute("INSERT INTO steps VALUES ('w1', 1, 'switch', 'started', '{}', 1.5)")
    db.execute("PRAGMA user_version = 1")
    db.close()

    with Journal(path) as journal:
        (left,) = journal.open_workflows()
        assert (left.id, left.kind, left.domain_name) == ("w1", "migrate", "vm1")
        assert [(s.name, s.status) for s in journal.steps("w1")] == [("switch", "started")]
        other = journal.begin("team-set", "u2", "vm2", "a", "a", {})
        with pytest.raises(WorkflowConflict):
            journal.begin("pool-define", "u1", "vm1", "a", "a", {})  # the index survived
        journal.finish(other, "done", {})
    check = sqlite3.connect(path)
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
    assert check.execute("PRAGMA foreign_key_check").fetchall() == []
    check.close()


def test_a_cancel_request_is_kept_once_and_seen_by_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    with Journal(path) as running, Journal(path) as other:
        wf = running.begin("migrate", "u1", "vm1", "a", "b", {})
        assert running.cancel_request(wf) is None
        first = other.request_cancel(wf, "ptmig cancel (pid 1)")
        again = other.request_cancel(wf, "SIGINT")
        assert again == first  # the first request is the one kept
        assert running.cancel_request(wf) == first
        running.finish(wf, "rolled-back", {})
        with pytest.raises(WorkflowClosed):
            other.request_cancel(wf, "too late")


def test_a_cancel_request_for_an_unknown_workflow_is_refused(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.sqlite") as journal, pytest.raises(UnknownWorkflow):
        journal.request_cancel("nope", "me")


def test_a_begin_forgets_closed_workflows_older_than_the_retention(path: Path) -> None:
    """Old closed workflows go with their steps and cancel requests; recent closed ones
    and open ones of any age stay."""
    with Journal(path, keep_closed_s=3600) as journal:
        old = begin(journal, domain=str(uuid.uuid4()))
        journal.record(old, "preflight", "done", {})
        journal.request_cancel(old, "test")
        journal.finish(old, "rolled-back", {})
        recent = begin(journal, domain=str(uuid.uuid4()))
        journal.finish(recent, "done", {})
        still_open = begin(journal, domain=str(uuid.uuid4()))
        with sqlite3.connect(path) as db:  # two hours ago, both the closed and the open
            db.execute(
                "UPDATE workflows SET updated = updated - 7200 WHERE id IN (?, ?)",
                (old, still_open),
            )
        assert journal.get(old) is not None  # nothing pruned before a workflow begins
        new = begin(journal, domain=str(uuid.uuid4()))
        assert journal.get(old) is None
        assert journal.steps(old) == []
        assert journal.cancel_request(old) is None
        assert {r.id for r in journal.recent(10)} == {recent, still_open, new}
        with sqlite3.connect(path) as db:
            assert (
                db.execute("SELECT COUNT(*) FROM steps WHERE workflow_id = ?", (old,)).fetchone()[0]
                == 0
            )
            assert (
                db.execute(
                    "SELECT COUNT(*) FROM cancel_requests WHERE workflow_id = ?", (old,)
                ).fetchone()[0]
                == 0
            )
