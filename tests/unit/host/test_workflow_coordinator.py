"""The Coordinator's other faces over the in-memory world: failover, status, pools,
workflows, recover (after a coordinator really died), the reconciler, and the ``ptmig``
CLI's exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from fake_guest import GuestTeam
from ptmig.v1 import guest_agent_pb2 as agent_pb
from workflow_fakes import (
    POOL,
    POOL_SLOTS,
    VM1,
    VM2,
    A,
    B,
    Events,
    SimulatedCrash,
    World,
    crash,
    crash_in_child,
    latest_steps,
)

from host import cli
from host.agent_client import AgentError
from host.commandline import render
from host.domain.domain_xml import parse_domain
from host.domain.pools import PoolKind
from host.domain.teams import TEAMS_NS, TEAMS_PREFIX
from host.hypervisor import HypervisorError
from host.workflow.coordinator import Coordinator, Reconciler
from host.workflow.errors import WorkflowError
from host.workflow.journal import Journal, WorkflowKind
from host.workflow.model import (
    GuestEvent,
    MigrationReport,
    MigrationRequest,
    Outcome,
    PoolStatus,
    TeamMode,
    from_plain,
    to_json,
)

REPO = Path(__file__).resolve().parents[3]
REQUEST = MigrationRequest("vm1", A, B)
A_TAPS = {tap for tap, _ in POOL_SLOTS[A]}
B_TAPS = {tap for tap, _ in POOL_SLOTS[B]}
BOTH = ("lan", "wan")


@pytest.fixture
def coordinator(world: World, journal: Journal) -> Coordinator:
    return world.coordinator(journal)


def recorded_taps(world: World, uri: str) -> dict[str, str | None]:
    teams = parse_domain(world.live_xml("vm1", uri)).teams
    assert teams is not None
    return {t.name: t.primary.tap if t.primary else None for t in teams.teams}


def on(mode: str) -> dict[str, str]:
    return dict.fromkeys(BOTH, mode)


# -- failover ----------------------------------------------------------------------------


def test_failover_to_standby_and_back(
    world: World, coordinator: Coordinator, journal: Journal
) -> None:
    assert coordinator.failover(A, "vm1", TeamMode.STANDBY).teams == on("standby")
    assert world.modes("vm1") == on("standby")
    assert recorded_taps(world, A) == {"lan": "ptv-a1", "wan": "ptv-a2"}  # still plugged
    assert {t.name: t.mode for t in coordinator.status(A, "vm1").teams} == on("standby")
    record = journal.recent(1)[0]
    assert (record.kind, record.outcome) == (WorkflowKind.FAILOVER, "done")
    assert record.report == {"teams": on("standby")}

    assert coordinator.failover(A, "vm1", TeamMode.PRIMARY).teams == on("primary")
    assert world.modes("vm1") == on("primary")
    assert world.active_taps("vm1") == {"lan": "ptv-a1", "wan": "ptv-a2"}
    assert not [c for c in world.calls if c.method in ("attach", "detach_and_wait")]
    assert journal.open_workflows() == []
    assert world.agents_open == 0


def test_failover_to_primary_plugs_a_device_where_none_is_recorded(journal: Journal) -> None:
    world = World(slots={B: 0})
    coordinator = world.coordinator(journal)
    assert coordinator.migrate(REQUEST).outcome is Outcome.DONE_DEGRADED

    assert coordinator.failover(B, "vm1", TeamMode.PRIMARY).teams == on(
        "standby"
    )  # nothing free yet
    world.set_slots(B, 1)
    assert sorted(coordinator.failover(B, "vm1", TeamMode.PRIMARY).teams.values()) == [
        "primary",
        "standby",
    ]
    world.set_slots(B, 2)
    assert coordinator.failover(B, "vm1", TeamMode.PRIMARY).teams == on("primary")
    assert set(recorded_taps(world, B).values()) == {"ptv-b1", "ptv-b2"}


def test_failover_forgets_a_recorded_primary_that_is_gone(
    world: World, coordinator: Coordinator
) -> None:
    hv = world.connect(A)
    hv.domain("vm1").detach_and_wait("ua-ptmig-wan-1", 5)  # someone unplugged it

    assert coordinator.failover(A, "vm1", TeamMode.PRIMARY).teams == on("primary")
    taps = recorded_taps(world, A)
    assert taps["lan"] == "ptv-a1" and taps["wan"] in A_TAPS
    assert world.active_taps("vm1") == taps


def test_failover_to_primary_says_why_a_team_stayed_on_its_standby(
    world: World, coordinator: Coordinator, journal: Journal
) -> None:
    """A bind that fails is undone (the device unplugged) and its reason is in the
    result and the journal, not only in a log line (seen with a VF that could not join)."""
    coordinator.failover(A, "vm1", TeamMode.STANDBY)
    hv = world.connect(A)
    hv.domain("vm1").detach_and_wait("ua-ptmig-wan-1", 5)
    world.fail(
        "agent", "BindPrimary", AgentError("FAILED_PRECONDITION", "MAC refused"), subject="wan"
    )

    result = coordinator.failover(A, "vm1", TeamMode.PRIMARY)
    assert result.teams == {"lan": "primary", "wan": "standby"}
    assert list(result.why) == ["wan"] and "MAC refused" in result.why["wan"]
    assert "bind failed" in result.why["wan"]
    assert journal.recent(1)[0].report["why"] == result.why
    assert render.failover_text(result).splitlines()[1].startswith("wan: standby (team wan: bind")


def test_failover_refuses_an_unknown_target(
    world: World, coordinator: Coordinator, journal: Journal
) -> None:
    with pytest.raises(WorkflowError, match="failover goes to standby or primary"):
        coordinator.failover(A, "vm1", TeamMode.DEGRADED)
    assert journal.recent() == []
    assert world.mutations() == []


def test_failed_failover_is_not_journalled_as_done(
    world: World, coordinator: Coordinator, journal: Journal
) -> None:
    world.fail("agent", "UseStandby", AgentError("DEADLINE_EXCEEDED", "no carrier"), subject="wan")

    with pytest.raises(AgentError):
        coordinator.failover(A, "vm1", TeamMode.STANDBY)

    assert journal.recent(1)[0].outcome == "failed"


# -- status, pools, workflows ------------------------------------------------------------


def test_status_reports_where_each_team_runs(world: World, coordinator: Coordinator) -> None:
    status = coordinator.status(A, "vm1")

    assert (status.domain, status.uuid, status.uri) == ("vm1", VM1.uuid, A)
    lan, wan = status.teams
    assert (lan.name, lan.mode, lan.pool, lan.mac_policy) == ("lan", "primary", "lab", "preserve")
    assert lan.primary is not None
    assert (lan.primary.tap, lan.primary.alias) == ("ptv-a1", "ua-ptmig-lan-1")
    assert lan.active_member == "enp3s0" and lan.members == ("enp1s0", "enp3s0")
    assert (wan.name, wan.mode) == ("wan", TeamMode.PRIMARY)
    assert status.agent_error == "" and status.open_workflow_id == ""
    assert world.mutations() == []


def test_status_of_a_degraded_domain_and_of_a_silent_agent(journal: Journal) -> None:
    world = World(slots={B: 0})
    coordinator = world.coordinator(journal)
    coordinator.migrate(REQUEST)

    status = coordinator.status(B, "vm1")
    assert {t.name: t.mode for t in status.teams} == on("degraded")
    assert status.teams[0].primary is None

    world.guest("vm1").agent_up = False
    status = coordinator.status(B, VM1.uuid)
    assert {t.name: t.mode for t in status.teams} == on("unknown")
    assert "UNAVAILABLE" in status.agent_error
    assert all(t.detail == f"guest agent: {status.agent_error}" for t in status.teams)


#: What a guest-managed team's agent says it did, with a control sequence in its reason.
BOUND = agent_pb.TeamEvent(
    kind="primary-bound",
    device="enp3s0",
    reason="enp3s0 (0000:03:00.0) plugged, matches its rule\x1b[31m",
    ok=True,
    detail="enp3s0 bound and active, team MAC 52:54:00:aa:00:05",
    unix_ms=1_796_000_000_123,
)


def guest_managed(world: World) -> None:
    """vm1's team lan guest-managed with an event; a team db the guest manages and ptmig
    has no record of (a Nova guest's, say), with no primary."""
    guest = world.guest("vm1")
    guest.teams["lan"].managed_by_guest = True
    guest.teams["lan"].last_event = BOUND
    guest.teams["db"] = GuestTeam(
        "db", "bond7", "none", "52:54:00:dd:00:01", None, 1, managed_by_guest=True
    )


def test_status_shows_what_a_guest_managed_team_did_on_its_own(
    world: World, coordinator: Coordinator
) -> None:
    guest_managed(world)
    status = coordinator.status(A, "vm1")
    lan, wan, db = status.teams
    assert lan.managed_by_guest and lan.mode is TeamMode.PRIMARY and lan.case == "plugged"
    assert lan.last_event == GuestEvent(
        kind="primary-bound",
        device="enp3s0",
        reason="enp3s0 (0000:03:00.0) plugged, matches its rule?[31m",  # made printable
        ok=True,
        detail="enp3s0 bound and active, team MAC 52:54:00:aa:00:05",
        unix_ms=1_796_000_000_123,
    )
    assert not wan.managed_by_guest and wan.last_event is None
    assert (db.name, db.mode, db.case, db.pool, db.mac_policy) == (
        "db",
        TeamMode.DEGRADED,
        "guest-managed",
        "",
        "none",
    )
    assert db.managed_by_guest and db.last_event is None and db.primary is None
    text = render.status_text(status).splitlines()
    assert text[2] == (
        "    managed by the guest's agent; last event primary-bound enp3s0 at "
        "2026-11-30 00:53:20 UTC: enp3s0 (0000:03:00.0) plugged, matches its rule?[31m; "
        "enp3s0 bound and active, team MAC 52:54:00:aa:00:05"
    )
    assert text[-2:] == [
        "  team db: on degraded, active -, primary -, pool , MAC policy none",
        "    managed by the guest's agent; nothing done on its own since the agent started",
    ]
    assert world.mutations() == []


def test_status_refuses_an_event_about_a_link_no_kernel_would_name(
    world: World, coordinator: Coordinator
) -> None:
    guest = world.guest("vm1")
    guest.teams["lan"].managed_by_guest = True
    guest.teams["lan"].last_event = agent_pb.TeamEvent(kind="primary-lost", device="../x")
    status = coordinator.status(A, "vm1")
    assert "event device '../x'" in status.agent_error
    assert {t.mode for t in status.teams} == {TeamMode.UNKNOWN}


def lab_pool(free: list[str], total: int = 4) -> PoolStatus:
    return PoolStatus("lab", PoolKind.EMULATED, total, len(free), tuple(free))


def test_pools_count_free_devices_per_host(world: World, coordinator: Coordinator) -> None:
    assert coordinator.pools(A) == [lab_pool(["ptv-a3", "ptv-a4"])]
    assert coordinator.pools(B) == [lab_pool(["ptv-b1", "ptv-b2", "ptv-b3", "ptv-b4"])]

    assert coordinator.migrate(REQUEST).outcome is Outcome.DONE

    assert coordinator.pools(A) == [lab_pool(["ptv-a1", "ptv-a2", "ptv-a3", "ptv-a4"])]
    assert coordinator.pools(B) == [lab_pool(["ptv-b3", "ptv-b4"])]
    world.set_slots(B, None)
    assert coordinator.pools(B) == []  # "default" is no pool


def test_workflows_lists_the_journal_newest_first(coordinator: Coordinator) -> None:
    coordinator.failover(A, "vm1", TeamMode.STANDBY)
    coordinator.migrate(REQUEST)

    rows = coordinator.workflows()
    assert [(r.kind, r.outcome) for r in rows] == [("migrate", "done"), ("failover", "done")]
    assert all(r.state == "closed" and r.owner_alive for r in rows)


# -- recover: finish what a dead coordinator left ----------------------------------------


def crash_migration(world: World, journal_path: Path, events: Events) -> None:
    crash_in_child(world, journal_path, lambda c: c.migrate(REQUEST, events))


def open_one(journal: Journal) -> str:
    (left,) = journal.open_workflows()
    assert not journal.is_owner_alive(left)
    return left.id


def test_recover_rolls_back_when_the_vm_is_still_on_the_source(
    world: World, journal_path: Path
) -> None:
    crash_migration(world, journal_path, Events({("unplug", "started"): crash}))
    assert world.modes("vm1") == on("standby")  # switched, then the coordinator died

    with Journal(journal_path) as journal:
        workflow_id = open_one(journal)
        (result,) = world.coordinator(journal).recover()

        assert (result.workflow_id, result.action) == (workflow_id, "rolled-back")
        assert "on the source" in result.detail
        record = journal.get(workflow_id)
        assert record is not None and (record.state, record.outcome) == ("closed", "rolled-back")
        assert record.report is not None and record.report["recovered"] is True
        assert journal.open_workflows() == []
    assert world.running_on("vm1") == [A]
    assert world.modes("vm1") == on("primary")
    assert world.active_taps("vm1") == {"lan": "ptv-a1", "wan": "ptv-a2"}


def test_recover_replugs_a_primary_unplugged_before_the_crash(
    world: World, journal_path: Path
) -> None:
    """Killed between a detach and the metadata write: the record names a device that
    is gone; recovery must plug a new one rather than bind a ghost."""
    world.fail(A, "set_metadata", SimulatedCrash())
    crash_migration(world, journal_path, Events())
    plugged = parse_domain(world.live_xml("vm1", A))
    assert sum(1 for i in plugged.interfaces if (i.alias or "").startswith("ua-ptmig-")) == 1

    with Journal(journal_path) as journal:
        (result,) = world.coordinator(journal).recover()

    assert result.action == "rolled-back"
    assert world.modes("vm1") == on("primary")
    taps = recorded_taps(world, A)
    assert set(taps.values()) <= A_TAPS and world.active_taps("vm1") == taps


def test_recover_rolls_forward_when_the_vm_is_on_the_destination(
    world: World, journal_path: Path
) -> None:
    crash_migration(world, journal_path, Events({("bind", "started"): crash}))
    assert world.running_on("vm1") == [B]

    with Journal(journal_path) as journal:
        (result,) = world.coordinator(journal).recover()
        assert result.action == "done" and "on the destination" in result.detail
        assert journal.open_workflows() == []
    assert world.modes("vm1") == on("primary")
    assert set(world.active_taps("vm1").values()) <= B_TAPS
    assert recorded_taps(world, B) == world.active_taps("vm1")


def test_recover_after_a_crash_inside_the_migration_call(world: World, journal_path: Path) -> None:
    world.fail(A, "migrate:after", SimulatedCrash())
    crash_migration(world, journal_path, Events())

    with Journal(journal_path) as journal:
        last = latest_steps(journal, open_one(journal))
        assert str(last["migrate"].status) == "started"
        (result,) = world.coordinator(journal).recover()

    assert result.action == "done"
    assert world.running_on("vm1") == [B]
    assert world.modes("vm1") == on("primary")


def test_recover_waits_for_a_migration_job_the_dead_coordinator_left_running(
    world: World, journal_path: Path
) -> None:
    """libvirtd runs a p2p migration on after its client died: recover must not look
    where the VM is (both hosts, for a moment) before that job ended."""
    crash_migration(world, journal_path, Events({("migrate", "started"): crash}))
    record = world.hosts[A].domains[VM1.uuid]
    record.job_running = True
    polls = []

    def job_ends_at_third_poll(_subject: str) -> None:
        polls.append(1)
        if len(polls) == 3:
            record.job_running = False

    world.before[(A, "job_running")] = job_ends_at_third_poll
    with Journal(journal_path) as journal:
        (result,) = world.coordinator(journal).recover()

    assert len(polls) == 4  # three while it waits, then the lease looks before repairing
    assert result.action == "rolled-back"
    assert world.modes("vm1") == on("primary")


@pytest.mark.parametrize("where", ["no-host", "both-hosts"])
def test_recover_refuses_to_guess_where_the_vm_is(
    world: World, journal_path: Path, where: str
) -> None:
    crash_migration(world, journal_path, Events({("migrate", "started"): crash}))
    if where == "no-host":
        world.destroy("vm1", A)
    else:
        world.duplicate("vm1", A, B)
    world.calls.clear()

    with Journal(journal_path) as journal:
        (result,) = world.coordinator(journal).recover()
        assert result.action == "failed"
        assert "check by hand" in result.detail
        assert journal.open_workflows() == []
        assert journal.recent(1)[0].outcome == "failed"
    assert world.mutations() == []


def test_recover_leaves_a_living_coordinators_workflow_alone(
    world: World, journal: Journal, journal_path: Path
) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from host.workflow.journal import Journal\n"
            "j = Journal(sys.argv[1])\n"
            "j.begin('migrate', sys.argv[2], 'vm1', 'fake://a', 'fake://b', {})\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n",
            str(journal_path),
            VM1.uuid,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        (result,) = world.coordinator(journal).recover()
        assert result.action == "still running"
        (still,) = journal.open_workflows()
        assert still.owner_pid == holder.pid
    finally:
        holder.kill()
        holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
    assert world.mutations() == []


def test_recover_with_nothing_open(coordinator: Coordinator) -> None:
    assert coordinator.recover() == []


def test_after_recovery_the_domain_migrates_again(world: World, journal_path: Path) -> None:
    crash_migration(world, journal_path, Events({("switch", "done"): crash}))

    with Journal(journal_path) as journal:
        coordinator = world.coordinator(journal)
        assert [r.action for r in coordinator.recover()] == ["rolled-back"]
        report = coordinator.migrate(REQUEST)

    assert report.outcome is Outcome.DONE, report.error
    assert world.running_on("vm1") == [B]


def test_recover_in_the_same_process_leaves_a_running_migration_alone(
    world: World, journal_path: Path
) -> None:
    paused, resume = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def pause() -> None:
        paused.set()
        resume.wait(10)

    def run() -> None:
        with Journal(journal_path) as journal:
            try:
                outcome["report"] = world.coordinator(journal).migrate(
                    REQUEST, Events({("unplug", "started"): pause})
                )
            except Exception as exc:
                outcome["error"] = exc

    worker = threading.Thread(target=run)
    worker.start()
    try:
        assert paused.wait(10)
        with Journal(journal_path) as journal:
            results = world.coordinator(journal).recover()
    finally:
        resume.set()
        worker.join(30)
    assert [r.action for r in results] == ["still running"]
    report = outcome.get("report")
    assert report is not None and report.outcome is Outcome.DONE  # type: ignore[attr-defined]


# -- the reconciler ----------------------------------------------------------------------


def test_reconciler_repairs_and_backs_off_from_a_broken_host(journal: Journal) -> None:
    world = World(slots={B: 0})
    coordinator = world.coordinator(journal)
    coordinator.migrate(REQUEST)
    world.set_slots(B, 2)
    reconciler = Reconciler(coordinator, [B, "fake://gone"], interval=0.0)

    repaired = reconciler.run_once()

    assert [(r.domain_uuid, r.teams, r.error) for r in repaired] == [(VM1.uuid, on("primary"), "")]
    assert world.modes("vm1") == on("primary")
    assert reconciler._backoff == {B: 1, "fake://gone": 2}


def test_stopping_the_reconciler_waits_for_its_repair_and_closes_the_workflow(
    journal: Journal,
) -> None:
    world = World(slots={B: 0})
    coordinator = world.coordinator(journal)
    coordinator.migrate(REQUEST)
    world.set_slots(B, 2)
    attaching, resume = threading.Event(), threading.Event()

    def hold(_alias: str) -> None:
        attaching.set()
        resume.wait(10)

    world.before[(B, "attach")] = hold
    reconciler = Reconciler(coordinator, [B], interval=0.0)
    reconciler.start()
    assert attaching.wait(10)
    stopper = threading.Thread(target=reconciler.stop)
    stopper.start()
    stopper.join(0.5)
    assert stopper.is_alive(), "stop() returned while a repair was in progress"
    resume.set()
    stopper.join(10)

    assert not stopper.is_alive()
    assert journal.open_workflows() == []
    assert world.modes("vm1") == on("primary")


def test_a_reconciler_pass_tells_the_metrics_agents_pools_and_degraded_teams(
    journal: Journal,
) -> None:
    """What the alerting rules read (packaging/host/monitoring), from a real pass."""
    pytest.importorskip("prometheus_client")
    from host.metrics import PrometheusObserver

    world = World((VM1, VM2), slots={A: 4})
    coordinator = world.coordinator(journal)
    observer = PrometheusObserver()
    coordinator.observer = observer

    def sample(name: str, **labels: str) -> float | None:
        return observer.registry.get_sample_value(name, labels)

    coordinator.reconcile(A)
    assert sample("ptmig_agent_up", host=A, domain="vm1") == 1
    assert sample("ptmig_agent_up", host=A, domain="vm2") == 1
    # vm1's two teams and vm2's name the pool; every device is theirs or free
    assert sample("ptmig_pool_teams", host=A, pool=POOL) == 2 + len(VM2.teams)
    used = sum(1 for t in (*VM1.teams, *VM2.teams) if t.slot is not None)
    assert sample("ptmig_pool_free_devices", host=A, pool=POOL) == 4 - used
    assert sample("ptmig_pool_devices", host=A, pool=POOL) == 4
    assert sample("ptmig_degraded_teams", host=A) == 0
    first = sample("ptmig_reconcile_last_pass_timestamp_seconds", host=A)
    assert first is not None and first > 0

    # vm2's agent stops answering: the next pass says so, and only for vm2
    def unavailable(_subject: str, _timeout: float | None) -> None:
        raise AgentError("UNAVAILABLE", "cannot reach the guest agent")

    world.agent_before[("vm2", "GetState")] = unavailable
    coordinator.reconcile(A)
    assert sample("ptmig_agent_up", host=A, domain="vm2") == 0
    assert sample("ptmig_agent_up", host=A, domain="vm1") == 1

    # vm1 leaves A: its series leave with it; B counts its teams, now degraded
    world.set_slots(B, 0)
    assert coordinator.migrate(REQUEST).outcome is Outcome.DONE_DEGRADED
    coordinator.reconcile(A)
    coordinator.reconcile(B)
    assert sample("ptmig_agent_up", host=A, domain="vm1") is None
    assert sample("ptmig_agent_up", host=B, domain="vm1") == 1
    assert sample("ptmig_pool_teams", host=B, pool=POOL) == 2
    assert sample("ptmig_pool_free_devices", host=B, pool=POOL) == 0
    assert sample("ptmig_degraded_teams", host=B) == 2


def test_a_migration_that_raises_counts_as_failed(
    world: World, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A defect that escapes the workflow still counts, or 'migrations failing' misses it."""
    pytest.importorskip("prometheus_client")
    from host.metrics import PrometheusObserver
    from host.workflow.migration import MigrationWorkflow

    coordinator = world.coordinator(journal)
    coordinator.observer = observer = PrometheusObserver()
    assert coordinator.migrate(REQUEST).outcome is Outcome.DONE

    def broken(self: object) -> None:
        raise RuntimeError("a defect")

    monkeypatch.setattr(MigrationWorkflow, "run", broken)
    with pytest.raises(RuntimeError, match="a defect"):
        coordinator.migrate(MigrationRequest("vm1", B, A))

    def count(outcome: str) -> float | None:
        return observer.registry.get_sample_value("ptmig_migrations_total", {"outcome": outcome})

    assert (count("done"), count("failed")) == (1, 1)
    assert journal.recent(1)[0].outcome == "failed"


# -- the ptmig CLI -------------------------------------------------------------------------


Ptmig = Callable[..., tuple[int, str, str]]


@pytest.fixture
def ptmig(
    world: World,
    journal: Journal,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Ptmig:
    """``ptmig ARGS`` over the world: (exit code, stdout, stderr)."""
    monkeypatch.setattr(cli, "_coordinator", lambda args: world.coordinator(journal))

    def run(*args: str) -> tuple[int, str, str]:
        code = cli.main(["-c", A, *args])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_cli_migrate_done_is_0(ptmig: Ptmig, world: World) -> None:
    code, out, _ = ptmig("migrate", "vm1", B)
    assert code == cli.EXIT_OK == 0
    assert out.startswith("vm1: done")
    assert world.running_on("vm1") == [B]


def test_cli_migrate_json_report(ptmig: Ptmig) -> None:
    code, out, _ = ptmig("migrate", "vm1", B, "--json")
    report = json.loads(out)
    assert code == 0 and report["outcome"] == "done"
    assert [p["name"] for p in report["phases"]] == [
        "preflight",
        "switch",
        "unplug",
        "migrate",
        "bind",
    ]
    # read back as the report it was printed from (what the lab does with it)
    typed = from_plain(MigrationReport, report)
    assert typed.outcome is Outcome.DONE and set(typed.teams.values()) == {TeamMode.PRIMARY}
    assert typed.migration is not None and typed.migration.wall_s >= 0
    assert json.loads(to_json(typed)) == report


def test_cli_migrate_degraded_is_3(ptmig: Ptmig, world: World) -> None:
    world.set_slots(B, 1)
    code, out, _ = ptmig("migrate", "vm1", B)
    assert code == cli.EXIT_DEGRADED == 3
    assert "done-degraded" in out


def test_cli_migrate_refused_is_4_in_one_line(ptmig: Ptmig, world: World) -> None:
    world.guest("vm1").agent_up = False
    code, out, err = ptmig("migrate", "vm1", B)
    assert code == cli.EXIT_ROLLED_BACK == 4
    assert out == ""
    *progress, last = err.splitlines()
    prefix = "ptmig: migrate vm1: refused, nothing changed: "
    assert last.startswith(prefix + "the agent in vm1 does not answer: UNAVAILABLE: ")
    why, hint = last.removeprefix(prefix).split("; ")
    assert hint == "check that ptmig-agent runs in the guest (systemctl status ptmig-agent)"
    assert progress == ["preflight: started", f"preflight: failed {why}"]
    assert "Traceback" not in err


def test_cli_hostile_agent_is_a_refusal_without_traceback(ptmig: Ptmig, world: World) -> None:
    world.tamper["GetState"] = lambda reply: reply.teams[0].members.append("x" * 200)
    code, _, err = ptmig("migrate", "vm1", B)
    assert code == 4
    assert "invalid reply from the guest" in err and "Traceback" not in err
    assert err.splitlines()[-1].startswith("ptmig: migrate vm1: refused, nothing changed: ")
    assert all(line.isprintable() for line in err.splitlines())


def test_cli_migrate_rolled_back_is_4(ptmig: Ptmig, world: World) -> None:
    world.fail(A, "migrate", HypervisorError("migrate vm1: job aborted", 1))
    code, out, _ = ptmig("migrate", "vm1", B)
    assert code == 4
    assert out.startswith("vm1: rolled-back (migrate vm1: job aborted)")
    assert world.running_on("vm1") == [A]


def test_cli_migrate_failed_is_5(ptmig: Ptmig, world: World) -> None:
    world.fail(A, "migrate", HypervisorError("migrate vm1: job aborted", 1))
    world.before[(A, "migrate")] = lambda _: world.fail(
        A, "set_metadata", HypervisorError("set metadata: disk full", 1), every=True
    )
    code, out, _ = ptmig("migrate", "vm1", B)
    assert code == cli.EXIT_FAILED == 5
    assert out.startswith("vm1: failed") and "disk full" in out


def test_cli_busy_domain_is_6(ptmig: Ptmig, world: World, journal: Journal) -> None:
    journal.begin("migrate", VM1.uuid, "vm1", A, B, {})
    code, _, err = ptmig("migrate", "vm1", B)
    assert code == cli.EXIT_BUSY == 6
    assert "already has an open migrate workflow" in err
    assert world.mutations() == []


@pytest.mark.parametrize(
    "args",
    [
        ["migrate", "vm1"],
        ["failover", "vm1", "--to", "sideways"],
        ["migrate", "vm1", B, "--max-downtime", "soon"],
        ["frobnicate"],
    ],
)
def test_cli_bad_arguments_are_2(ptmig: Ptmig, world: World, args: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        ptmig(*args)
    assert caught.value.code == cli.EXIT_USAGE == 2
    assert world.calls == []


def test_cli_unusable_team_metadata_is_2(ptmig: Ptmig, world: World) -> None:
    hv = world.connect(A)
    hv.domain("vm1").set_metadata(
        TEAMS_NS,
        TEAMS_PREFIX,
        "<teams><team name='lan' pool='lab' mac-polcy='preserve'/></teams>",
    )
    world.calls.clear()
    code, _, err = ptmig("status", "vm1")
    assert code == 2
    assert "unknown attribute 'mac-polcy'" in err
    assert world.mutations() == []


def test_cli_status_json_has_the_guest_managed_fields(ptmig: Ptmig, world: World) -> None:
    guest_managed(world)
    code, out, _ = ptmig("status", "vm1", "--json")
    assert code == 0
    teams = {t["name"]: t for t in json.loads(out)["teams"]}
    assert teams["lan"]["managed_by_guest"] is True
    assert teams["lan"]["last_event"]["kind"] == "primary-bound"
    assert teams["lan"]["last_event"]["unix_ms"] == BOUND.unix_ms
    assert teams["wan"]["managed_by_guest"] is False and teams["wan"]["last_event"] is None
    assert teams["db"]["case"] == "guest-managed"


def test_cli_failover_status_pools_recover(ptmig: Ptmig) -> None:
    assert ptmig("failover", "vm1", "--to", "standby")[:2] == (0, "lan: standby\nwan: standby\n")
    code, out, _ = ptmig("status", "vm1", "--json")
    assert code == 0 and json.loads(out)["teams"][0]["mode"] == "standby"
    assert ptmig("failover", "vm1", "--to", "primary")[0] == 0
    code, out, _ = ptmig("pools")
    assert code == 0 and out.split()[:6] == ["lab", "emulated", "free", "2", "of", "4"]
    assert ptmig("recover")[:2] == (0, "nothing to recover\n")


def test_cli_failover_to_primary_without_a_free_device_is_3(
    ptmig: Ptmig, world: World, journal: Journal
) -> None:
    world.set_slots(B, 0)
    world.coordinator(journal).migrate(REQUEST)
    code, out, _ = ptmig("-c", B, "failover", "vm1", "--to", "primary")
    assert code == cli.EXIT_DEGRADED
    assert out == "".join(
        f"{t}: standby (team {t}: no free device in pool lab; stays on its standby)\n"
        for t in ("lan", "wan")
    )


def test_cli_recover_failed_is_5(ptmig: Ptmig, world: World, journal_path: Path) -> None:
    crash_migration(world, journal_path, Events({("migrate", "started"): crash}))
    world.destroy("vm1", A)
    code, out, _ = ptmig("recover")
    assert code == 5
    assert ": failed domain runs on no host" in out


def test_cli_unreachable_agent_is_8_in_one_line(ptmig: Ptmig, world: World) -> None:
    world.guest("vm1").agent_up = False
    code, _, err = ptmig("failover", "vm1", "--to", "standby")
    assert code == cli.EXIT_UNREACHABLE == 8
    (line,) = err.splitlines()
    assert line.startswith("ptmig: failover vm1: UNAVAILABLE: ")
    assert line.endswith(
        "; check that ptmig-agent runs in the guest (systemctl status ptmig-agent)"
    )


def test_cli_team_and_pool_commands_go_through_the_journal(
    ptmig: Ptmig, world: World, journal: Journal
) -> None:
    code, out, _ = ptmig("team-show", "vm1", "--json")
    assert code == 0 and [t["name"] for t in json.loads(out)["teams"]] == ["lan", "wan"]
    assert ptmig("team-remove", "vm1", "wan")[0] == 0
    assert ptmig("team-remove", "vm1", "wan")[:1] == (cli.EXIT_NOT_FOUND,)
    code, out, _ = ptmig(
        "team-set",
        "vm1",
        "--team",
        "wan",
        "--standby-mac",
        "52:54:00:00:02:01",
        "--pool",
        "lab",
        "--mac-policy",
        "none",
    )
    assert code == 0 and out.splitlines()[1].startswith("wan: standby 52:54:00:00:02:01")
    # 'vf' is the old spelling of vf-network
    code, out, _ = ptmig("pool-define", "vfs", "--kind", "vf", "--vf", "0000:5e:02.0")
    assert code == 0 and out.split()[:2] == ["vfs", "vf-network"]
    code, _, err = ptmig("pool-define", "nics", "--kind", "pci", "--bridge", "br0")
    assert code == cli.EXIT_USAGE and "a pci pool has no bridge" in err
    assert ptmig("pool-undefine", "vfs")[0] == 0
    assert ptmig("pool-undefine", "vfs")[0] == cli.EXIT_NOT_FOUND
    assert [w.kind for w in journal.recent()] == [
        "pool-undefine",
        "pool-define",
        "team-set",
        "team-remove",
    ]


@pytest.mark.parametrize(
    "args",
    [
        [
            "team-set",
            "vm1",
            "--team",
            "x",
            "--standby-mac",
            "1",
            "--pool",
            "p",
            "--mac-policy",
            "y",
        ],
        ["pool-define", "p", "--kind", "sriov"],
        ["pool-define", "p", "--kind", "emulated", "--slot", "tap-without-mac"],
    ],
)
def test_cli_bad_configuration_arguments_are_2(ptmig: Ptmig, world: World, args: list[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        ptmig(*args)
    assert caught.value.code == cli.EXIT_USAGE
    assert world.calls == []


def test_recover_closes_a_configuration_change_whose_coordinator_died(
    world: World, journal_path: Path
) -> None:
    pid = os.fork()
    if pid == 0:  # a coordinator killed inside team-set, between begin and finish
        try:
            Journal(journal_path).begin("team-set", VM1.uuid, "vm1", A, A, {"name": "lan"})
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    with Journal(journal_path) as journal:
        (result,) = world.coordinator(journal).recover()
        (row,) = journal.recent()
        assert journal.open_workflows() == []
    assert (result.domain, result.action, result.outcome) == ("vm1", "failed", Outcome.FAILED)
    assert "a team-set whose coordinator died" in result.detail
    assert (row.kind, row.outcome) == ("team-set", "failed")
    assert world.mutations() == []


def test_a_vf_is_refused_where_the_bond_would_give_it_another_mac() -> None:
    """A VF keeps the MAC its PF was given (the team's, else the standby's); a
    fail_over_mac=none bond gives members its own: they must be the same MAC."""
    from host.agent_client import TeamState
    from host.domain.pools import PciPool, VfNetworkPool
    from host.domain.teams import Team
    from host.workflow.macpolicy import mac_policy_refusal

    vfs = VfNetworkPool("lanvf", pf_dev="enp6s0")
    team = Team("lan", "52:54:00:aa:00:01", "preserve", "lanvf")
    bond = TeamState(name="lan", bond="bond0", fail_over_mac="none", mac="52:54:00:AA:00:01")
    assert mac_policy_refusal(team, vfs, bond) is None
    apart = Team("lan", "52:54:00:aa:00:01", "preserve", "lanvf", team_mac="52:54:00:cc:00:01")
    why = mac_policy_refusal(apart, vfs, bond)
    assert why is not None and "--team-mac 52:54:00:aa:00:01" in why and "bond0" in why
    follows = TeamState(name="lan", bond="bond0", fail_over_mac="active", mac="52:54:00:aa:00:09")
    assert mac_policy_refusal(apart, vfs, follows) is None  # the bond takes the VF's MAC
    assert mac_policy_refusal(apart, PciPool("nics", addresses=("0000:03:00.0",)), bond) is None


def test_policy_follow_is_refused_where_the_bond_does_not_follow() -> None:
    from host.agent_client import TeamState
    from host.domain.pools import PciPool
    from host.domain.teams import Team
    from host.workflow.macpolicy import mac_policy_refusal

    nics = PciPool("nics", addresses=("0000:03:00.0",))
    team = Team("wan", "52:54:00:aa:00:02", "follow", "nics")
    fixed = TeamState(name="wan", bond="bond1", fail_over_mac="none", mac="52:54:00:aa:00:02")
    why = mac_policy_refusal(team, nics, fixed)
    assert why is not None and "fail_over_mac active" in why and "--mac-policy preserve" in why
    follows = TeamState(name="wan", bond="bond1", fail_over_mac="active", mac="52:54:00:aa:00:02")
    assert mac_policy_refusal(team, nics, follows) is None
