"""The migration workflow end to end over the in-memory world (workflow_fakes).

Each test drives ``Coordinator.migrate`` as a face would and checks what a user would
check afterwards: where the VM runs, where each team's traffic runs (the guest's bond),
what the hosts' domain XML names, and what the journal says.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from workflow_fakes import (
    LAN,
    MUTATING,
    POOL_SLOTS,
    VM1,
    VM2,
    A,
    B,
    Events,
    GuestSpec,
    World,
)

from host.agent_client import AgentError
from host.domain.domain_xml import parse_domain
from host.domain.teams import TEAMS_NS, TEAMS_PREFIX
from host.hypervisor import HypervisorError, PostcopyFailed
from host.workflow.errors import PreflightError
from host.workflow.journal import Journal, WorkflowConflict, WorkflowKind, WorkflowRecord
from host.workflow.model import MigrationReport, MigrationRequest, Outcome

REQUEST = MigrationRequest("vm1", A, B)
PHASES = ["preflight", "switch", "unplug", "migrate", "bind"]
A_TAPS = {tap for tap, _ in POOL_SLOTS[A]}
A_MACS = {mac for _, mac in POOL_SLOTS[A]}
B_TAPS = {tap for tap, _ in POOL_SLOTS[B]}


def migrate(
    world: World,
    journal: Journal,
    events: Events | None = None,
    request: MigrationRequest = REQUEST,
) -> MigrationReport:
    return world.coordinator(journal).migrate(request, events or Events())


def last_workflow(journal: Journal) -> WorkflowRecord:
    record = journal.recent(1)[0]
    assert record.kind is WorkflowKind.MIGRATE
    return record


def step_rows(journal: Journal, workflow_id: str) -> list[tuple[str, str]]:
    return [(s.name, str(s.status)) for s in journal.steps(workflow_id)]


def teams_on(world: World, uri: str, name: str = "vm1") -> dict[str, str | None]:
    """Each team's recorded primary tap in the domain's metadata on *uri*."""
    teams = parse_domain(world.live_xml(name, uri)).teams
    assert teams is not None
    return {t.name: t.primary.tap if t.primary else None for t in teams.teams}


def device_aliases(xml: str) -> list[str]:
    info = parse_domain(xml)
    return sorted(i.alias for i in info.interfaces if i.alias and i.alias.startswith("ua-ptmig-"))


def assert_on_devices_of(world: World, uri: str, taps: set[str], name: str = "vm1") -> None:
    """Every team that is on a primary runs on a device of *uri*'s pool, one each, and the
    metadata on *uri* records exactly those devices."""
    active = world.active_taps(name)
    primaries = {t: tap for t, tap in active.items() if world.modes(name)[t] == "primary"}
    assert set(primaries.values()) <= taps
    assert len(set(primaries.values())) == len(primaries)
    recorded = teams_on(world, uri, name)
    assert {t: tap for t, tap in recorded.items() if tap} == primaries


def assert_back_on_source(
    world: World, report: MigrationReport, teams: tuple[str, ...] = ("lan", "wan")
) -> None:
    assert report.outcome is Outcome.ROLLED_BACK, report.error
    assert world.running_on("vm1") == [A]
    assert report.teams == dict.fromkeys(teams, "primary")
    assert world.modes("vm1") == dict.fromkeys(teams, "primary")
    assert_on_devices_of(world, A, A_TAPS)
    assert not any(c.method == "migrate" for c in world.calls) or report.error
    assert world.agents_open == 0


# -- the happy path ---------------------------------------------------------------------


def test_migration_puts_every_team_on_a_destination_primary(world: World, journal: Journal) -> None:
    events = Events()
    report = migrate(world, journal, events)

    assert report.outcome is Outcome.DONE, report.error
    assert report.error == ""
    assert report.teams == {"lan": "primary", "wan": "primary"}
    assert [p.name for p in report.phases] == PHASES
    assert report.migration is not None and report.migration.downtime_ms == 42
    assert events.of("done") == PHASES
    assert any(e.phase == "migrate" and e.fraction for e in events.events)
    # The VM runs on b only, each bond on a device from b's pool.
    assert world.running_on("vm1") == [B]
    assert world.find("vm1", A) is None
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    assert set(world.active_taps("vm1").values()) == {"ptv-b1", "ptv-b2"}
    # The metadata names b's devices only, and neither XML on b names a's.
    assert_on_devices_of(world, B, B_TAPS)
    for xml in (world.live_xml("vm1", B), world.config_xml("vm1", B)):
        assert not any(name in xml for name in A_TAPS | A_MACS)
    assert device_aliases(world.config_xml("vm1", B)) == ["ua-ptmig-lan-1", "ua-ptmig-wan-1"]
    # The journal closed the workflow as done, every step started before it was done.
    record = last_workflow(journal)
    assert (record.state, record.outcome) == ("closed", "done")
    assert record.report is not None and record.report["teams"] == report.teams
    assert step_rows(journal, record.id) == [
        (phase, status) for phase in PHASES for status in ("started", "done")
    ]
    assert journal.open_workflows() == []
    assert world.agents_open == 0


def test_the_workflow_says_when_the_vm_has_moved_from_the_migrate_steps_end(
    world: World, journal: Journal
) -> None:
    events = Events()
    report = migrate(world, journal, events)

    assert report.outcome is Outcome.DONE, report.error
    order = [(e.phase, e.state) for e in events.events]
    moved_at = order.index(("migrate", "done"))
    assert not any(e.moved for e in events.events[:moved_at])
    assert all(e.moved for e in events.events[moved_at:])
    assert ("bind", "started") in order[moved_at:]


def test_a_rolled_back_migration_never_says_moved(world: World, journal: Journal) -> None:
    world.fail(A, "migrate", HypervisorError("migrate vm1: operation failed: job aborted", 1))
    events = Events()
    report = migrate(world, journal, events)

    assert report.outcome is Outcome.ROLLED_BACK, report.error
    assert events.events and not any(e.moved for e in events.events)


def test_mac_policies_reach_the_guest(world: World, journal: Journal) -> None:
    migrate(world, journal)

    hv = world.connect(B)
    state = {t.name: t for t in world.agent_for(hv.domain("vm1"), 5).state().teams}
    links = {ln.name: ln for ln in world.agent_for(hv.domain("vm1"), 5).state().links}
    lan, wan = state["lan"], state["wan"]
    b_macs = {mac for _, mac in POOL_SLOTS[B]}
    # preserve: the new device carries the team's MAC; follow: the bond takes the device's.
    assert links[lan.active_member].mac == LAN.standby_mac
    assert links[lan.active_member].permanent_mac in b_macs
    assert wan.mac == links[wan.active_member].mac
    assert wan.mac in b_macs


def test_persistent_xml_sent_on_never_names_source_devices_without_aliases(
    world: World, journal: Journal
) -> None:
    """A definition may name a primary without our alias (libvirt keeps only ``ua-``
    aliases, ``virsh define`` needs none); detach then leaves it in the definition, and
    the persistent XML the destination gets must still be without it."""
    record = world.find("vm1", A)
    assert record is not None and record.config is not None
    for device in record.config.find("devices") or []:
        alias = device.find("alias")
        if alias is not None and alias.get("name", "").startswith("ua-ptmig-"):
            device.remove(alias)

    report = migrate(world, journal)

    assert report.outcome is Outcome.DONE, report.error
    assert not any(name in world.config_xml("vm1", B) for name in A_TAPS | A_MACS)


def test_peer_uri_is_what_the_source_migrates_to(world: World, journal: Journal) -> None:
    world.peers["fake+tcp://b.internal/system"] = B
    request = MigrationRequest("vm1", A, B, peer_uri="fake+tcp://b.internal/system")

    assert migrate(world, journal, request=request).outcome is Outcome.DONE
    assert world.running_on("vm1") == [B]


# -- preflight: refuse early, change nothing -------------------------------------------


def _no_agent(world: World) -> None:
    world.guest("vm1").agent_up = False


def _not_serving(world: World) -> None:
    world.guest("vm1").serving = False


def _team_unknown(world: World) -> None:
    del world.guest("vm1").teams["wan"]


def _bond_missing(world: World) -> None:
    world.guest("vm1").teams["wan"].bond_present = False


def _standby_down(world: World) -> None:
    world.guest("vm1").no_carrier.add("52:54:00:aa:00:02")


def _no_pool(world: World) -> None:
    world.set_slots(B, None)


def _same_host(world: World) -> None:
    world.hosts[B].host_uuid = world.hosts[A].host_uuid


def _shut_off(world: World) -> None:
    world.destroy("vm1", A)


def _already_there(world: World) -> None:
    world.duplicate("vm1", A, B)


def _no_teams(world: World) -> None:
    hv = world.connect(A)
    hv.domain("vm1").set_metadata(TEAMS_NS, TEAMS_PREFIX, None)


REFUSALS: dict[str, tuple[Callable[[World], None], str]] = {
    "agent-unavailable": (_no_agent, "agent in vm1 does not answer: UNAVAILABLE"),
    "agent-not-serving": (_not_serving, "agent in vm1 is not serving"),
    "team-unknown-in-guest": (_team_unknown, "does not know team 'wan'"),
    "bond-missing": (_bond_missing, "team wan: bond bond1 is missing"),
    "standby-without-carrier": (_standby_down, "team wan: the standby enp2s0 has no carrier"),
    "destination-without-pool": (_no_pool, "team lan: the destination has no pool lab"),
    "same-host": (_same_host, "source and destination are the same host"),
    "domain-not-running": (_shut_off, "vm1 is not running on fake://a"),
    "already-on-destination": (_already_there, "already running on the destination"),
    "no-teams": (_no_teams, "vm1 has no ptmig teams"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_preflight_refuses_and_changes_nothing(world: World, journal: Journal, case: str) -> None:
    arrange, message = REFUSALS[case]
    arrange(world)
    world.calls.clear()
    before = world.snapshot()

    with pytest.raises(PreflightError, match=message):
        migrate(world, journal)

    assert world.mutations() == []
    assert world.snapshot() == before
    record = last_workflow(journal)
    assert (record.state, record.outcome) == ("closed", "refused")
    assert record.report is not None and message in record.report["error"]
    assert step_rows(journal, record.id) == [("preflight", "started"), ("preflight", "failed")]
    assert world.agents_open == 0


def _long_member(reply: object) -> None:
    reply.teams[1].members.append("m" * 200)  # type: ignore[attr-defined]


def _bad_link_mac(reply: object) -> None:
    reply.links[0].mac = "52:54:00:zz:00:01\n<script>"  # type: ignore[attr-defined]


def _long_team_name(reply: object) -> None:
    reply.teams[0].name = "t" * 200  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "tamper", [_long_member, _bad_link_mac, _long_team_name], ids=lambda f: f.__name__[1:]
)
def test_hostile_agent_state_is_a_clean_refusal(
    world: World, journal: Journal, tamper: Callable[[object], None]
) -> None:
    world.tamper["GetState"] = tamper
    before = world.snapshot()

    with pytest.raises(PreflightError) as caught:
        migrate(world, journal)

    message = str(caught.value)
    assert "invalid reply from the guest" in message
    assert message.isprintable() and len(message) < 500
    assert "Traceback" not in message
    assert world.mutations() == []
    assert world.snapshot() == before
    assert last_workflow(journal).outcome == "refused"


def test_control_characters_in_agent_names_are_refused(world: World, journal: Journal) -> None:
    def escape_sequence(reply: object) -> None:
        reply.teams[0].active_member = "\x1b]0;pwned\x07"  # type: ignore[attr-defined]

    world.tamper["GetState"] = escape_sequence

    with pytest.raises(PreflightError, match="invalid reply from the guest"):
        migrate(world, journal)


# -- a destination without free devices -----------------------------------------------


def test_empty_destination_pool_degrades_and_the_reconciler_repairs_later(journal: Journal) -> None:
    world = World(slots={B: 0})
    events = Events()

    report = migrate(world, journal, events)

    assert report.outcome is Outcome.DONE_DEGRADED, report.error
    assert report.teams == {"lan": "standby", "wan": "standby"}
    assert world.running_on("vm1") == [B]
    assert world.modes("vm1") == {"lan": "standby", "wan": "standby"}
    assert teams_on(world, B) == {"lan": None, "wan": None}
    assert any(
        e.phase == "preflight" and e.state == "info" and "lan, wan" in e.message
        for e in events.events
    )
    assert last_workflow(journal).outcome == "done-degraded"

    world.set_slots(B, 4)
    repaired = world.coordinator(journal).reconcile(B)

    (repair_result,) = repaired
    assert (repair_result.domain_uuid, repair_result.error) == (VM1.uuid, "")
    assert repair_result.teams == {"lan": "primary", "wan": "primary"}
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    assert_on_devices_of(world, B, B_TAPS)
    repair = journal.recent(1)[0]
    assert (repair.kind, repair.state, repair.outcome) == (WorkflowKind.REPAIR, "closed", "done")
    assert repair.id == repair_result.workflow_id
    assert world.coordinator(journal).reconcile(B) == []  # nothing left to repair


def test_bind_failure_on_the_destination_unplugs_that_device_again(
    world: World, journal: Journal
) -> None:
    world.fail("agent", "BindPrimary", AgentError("DEADLINE_EXCEEDED", "no carrier"), subject="wan")

    report = migrate(world, journal)

    assert report.outcome is Outcome.DONE_DEGRADED, report.error
    assert report.teams == {"lan": "primary", "wan": "standby"}
    assert world.modes("vm1") == {"lan": "primary", "wan": "standby"}
    assert teams_on(world, B)["wan"] is None
    assert_on_devices_of(world, B, B_TAPS)
    for xml in (world.live_xml("vm1", B), world.config_xml("vm1", B)):
        assert device_aliases(xml) == ["ua-ptmig-lan-1"]
    (pool,) = world.coordinator(journal).pools(B)
    assert (pool.name, pool.kind, pool.total, pool.free) == ("lab", "emulated", 4, 3)


def test_hostile_bind_reply_on_the_destination_leaves_the_team_on_its_standby(
    world: World, journal: Journal
) -> None:
    def bad_device(reply: object) -> None:
        reply.device = "../../etc/passwd"  # type: ignore[attr-defined]

    world.tamper["BindPrimary"] = bad_device

    report = migrate(world, journal)

    assert report.outcome is Outcome.DONE_DEGRADED
    assert report.teams == {"lan": "standby", "wan": "standby"}
    assert device_aliases(world.live_xml("vm1", B)) == []
    assert teams_on(world, B) == {"lan": None, "wan": None}


# -- failures before the VM moved: roll back ------------------------------------------


SOLO1 = GuestSpec("vm1", VM1.uuid, (LAN,))


def test_switch_refused_rolls_back_untouched(journal: Journal) -> None:
    world = World((SOLO1,))
    world.fail("agent", "UseStandby", AgentError("DEADLINE_EXCEEDED", "standby lost carrier"))

    report = migrate(world, journal)

    assert_back_on_source(world, report, ("lan",))
    assert "standby lost carrier" in report.error
    assert teams_on(world, A) == {"lan": "ptv-a1"}
    assert not any(c.method in ("detach_and_wait", "attach", "migrate") for c in world.mutations())
    record = last_workflow(journal)
    assert record.outcome == "rolled-back"
    assert ("switch", "failed") in step_rows(journal, record.id)


def test_a_switch_that_timed_out_is_undone_too(journal: Journal) -> None:
    """The guest may still run a timed-out switch later: the undo binds the primary anyway."""
    world = World((SOLO1,))
    world.fail("agent", "UseStandby", AgentError("DEADLINE_EXCEEDED", "agent stopped"))

    report = migrate(world, journal)

    assert report.outcome is Outcome.ROLLED_BACK
    assert [c.subject for c in world.calls if (c.where, c.method) == ("agent", "BindPrimary")] == [
        "lan"
    ]


def test_rollback_whose_replug_finds_no_free_device_is_failed(
    world: World, journal: Journal
) -> None:
    world.fail(A, "migrate", HypervisorError("migrate vm1: operation failed: job aborted", 1))
    events = Events({("unplug", "done"): lambda: world.set_slots(A, 0)})

    report = migrate(world, journal, events)

    assert report.outcome is Outcome.FAILED
    assert "left on their standby" in report.error and "no free device" in report.error
    assert world.running_on("vm1") == [A]
    assert world.modes("vm1") == {"lan": "standby", "wan": "standby"}
    assert last_workflow(journal).outcome == "failed"


def test_rollback_that_leaves_a_team_off_its_primary_is_failed_not_rolled_back(
    journal: Journal,
) -> None:
    """Every compensation answered ok, yet the guest ran a late UseStandby after them
    (queued behind a stopped agent): the report says what the guest says."""
    world = World((SOLO1,))
    world.fail("agent", "UseStandby", AgentError("DEADLINE_EXCEEDED", "agent stopped"))
    guest = world.guest("vm1")

    def late_switch() -> None:
        guest.teams["lan"].active = guest.teams["lan"].standby_mac

    report = migrate(world, journal, Events({("switch", "compensated"): late_switch}))

    assert report.outcome is Outcome.FAILED
    assert "team lan is not back on its primary" in report.error
    assert report.teams == {"lan": "standby"}
    assert last_workflow(journal).outcome == "failed"


@pytest.mark.parametrize("how", ["timeout", "refuse"])
def test_unplug_failure_rolls_back_by_binding_the_primary_again(journal: Journal, how: str) -> None:
    world = World((SOLO1,))
    world.guest("vm1").hold["ua-ptmig-lan-1"] = how

    report = migrate(world, journal)

    assert_back_on_source(world, report, ("lan",))
    assert "release ua-ptmig-lan-1" in report.error
    assert teams_on(world, A) == {"lan": "ptv-a1"}
    rows = step_rows(journal, last_workflow(journal).id)
    # a failed step owes its compensation too (it may have acted for some teams)
    assert rows[-6:] == [
        ("unplug", "started"),
        ("unplug", "failed"),
        ("unplug", "compensating"),
        ("unplug", "compensated"),
        ("switch", "compensating"),
        ("switch", "compensated"),
    ]
    assert not any(c.method == "migrate" for c in world.calls)


def test_failed_migration_replugs_and_rebinds_on_the_source(world: World, journal: Journal) -> None:
    world.fail(A, "migrate", HypervisorError("migrate vm1: operation failed: job aborted", 1))

    report = migrate(world, journal)

    assert_back_on_source(world, report)
    assert "job aborted" in report.error
    # Each team got a device from a's pool again, recorded and in both XMLs.
    assert set(teams_on(world, A).values()) <= A_TAPS
    assert len(device_aliases(world.live_xml("vm1", A))) == 2
    assert len(device_aliases(world.config_xml("vm1", A))) == 2
    rows = step_rows(journal, last_workflow(journal).id)
    assert rows[-6:] == [
        ("migrate", "started"),
        ("migrate", "failed"),
        ("unplug", "compensating"),
        ("unplug", "compensated"),
        ("switch", "compensating"),
        ("switch", "compensated"),
    ]
    assert last_workflow(journal).outcome == "rolled-back"


BUG_PARTIAL_STEP = (
    "bug: host/workflow/steps.py StepRunner.run adds a step to _done only when its action "
    "returns, so a multi-team step (migration.py switch_to_standby / unplug) that fails "
    "part-way is never compensated: the teams it already moved stay on the standby "
    "(without a primary after unplug) while the outcome says rolled-back.  Since "
    "switch_to_standby runs the teams in parallel (guest.each_team) this also happens when "
    "the first team fails"
)


@pytest.mark.parametrize("fault", ["switch-second-team", "announce", "unplug-second-team"])
def test_a_step_failing_part_way_is_undone_too(world: World, journal: Journal, fault: str) -> None:
    if fault == "switch-second-team":
        world.fail(
            "agent", "UseStandby", AgentError("DEADLINE_EXCEEDED", "no carrier"), subject="wan"
        )
    elif fault == "announce":
        world.fail(A, "announce", HypervisorError("announce-self: QMP unavailable", 1))
    else:
        world.guest("vm1").hold["ua-ptmig-wan-1"] = "refuse"

    report = migrate(world, journal)

    assert report.outcome is Outcome.ROLLED_BACK
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}


def test_failed_compensation_is_a_failed_outcome_naming_the_error(
    world: World, journal: Journal
) -> None:
    world.fail(A, "migrate", HypervisorError("migrate vm1: operation failed: job aborted", 1))
    events = Events(
        {
            ("migrate", "started"): lambda: world.fail(
                A, "set_metadata", HypervisorError("set metadata of vm1: disk full", 1), every=True
            )
        }
    )

    report = migrate(world, journal, events)

    assert report.outcome is Outcome.FAILED
    assert "job aborted" in report.error
    assert "rollback: unplug:" in report.error and "disk full" in report.error
    assert world.running_on("vm1") == [A]
    record = last_workflow(journal)
    assert record.outcome == "failed"
    assert ("unplug", "failed") in step_rows(journal, record.id)[-4:]
    assert world.agents_open == 0


# -- the migration call failed, but the VM moved: go on --------------------------------


def test_migration_error_after_the_vm_moved_finishes_on_the_destination(
    world: World, journal: Journal
) -> None:
    world.fail(A, "migrate:after", HypervisorError("migrate vm1: connection reset", 1))

    report = migrate(world, journal)

    assert report.outcome is Outcome.DONE
    assert "connection reset" in report.error
    assert world.running_on("vm1") == [B]
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    assert_on_devices_of(world, B, B_TAPS)
    rows = step_rows(journal, last_workflow(journal).id)
    assert ("migrate", "failed") in rows
    assert not any(status.startswith("compensat") for _, status in rows)
    assert rows[-2:] == [("bind", "started"), ("bind", "done")]


# -- the migration failed in post-copy: nothing to undo that can be undone -----------


def test_a_migration_failed_in_postcopy_is_not_rolled_back_and_says_what_to_do(
    world: World, journal: Journal
) -> None:
    world.fail(A, "migrate", PostcopyFailed("migrate vm1: failed in post-copy: EOF", 1))
    calls_before = len(world.calls)

    report = migrate(world, journal)

    assert report.outcome is Outcome.FAILED
    assert "failed in post-copy" in report.error
    assert "--postcopy-resume vm1" in report.error and "virsh destroy vm1" in report.error
    # No replug on the paused source, no bind through its frozen agent, nothing on B.
    after = world.calls[calls_before:]
    migrate_at = next(i for i, c in enumerate(after) if c.method == "migrate")
    assert not [c for c in after[migrate_at + 1 :] if c.method in MUTATING]
    assert not [c for c in after[migrate_at + 1 :] if c.where == "agent"]
    rows = step_rows(journal, last_workflow(journal).id)
    assert ("migrate", "failed") in rows and ("postcopy", "failed") in rows
    assert not any(status.startswith("compensat") for _, status in rows)
    assert last_workflow(journal).outcome == "failed"
    assert world.agents_open == 0


# -- one workflow per domain, and the last free device ---------------------------------


def test_second_migration_of_the_same_domain_is_refused_while_one_runs(
    world: World, journal: Journal, journal_path: Path
) -> None:
    outcome: dict[str, object] = {}

    def second() -> None:
        calls_before = len(world.calls)
        with Journal(journal_path) as other:
            try:
                migrate(world, other)
            except WorkflowConflict as exc:
                outcome["error"] = exc
        outcome["calls"] = world.calls[calls_before:]

    report = migrate(world, journal, Events({("switch", "started"): second}))

    conflict = outcome["error"]
    assert isinstance(conflict, WorkflowConflict) and conflict.owner_alive
    assert "still running" in str(conflict)
    calls = outcome["calls"]
    assert isinstance(calls, list) and not [c for c in calls if c.method in MUTATING]
    assert report.outcome is Outcome.DONE  # the first one went on undisturbed
    assert [w.outcome for w in journal.recent(5)] == ["done"]


def test_last_free_device_sequentially_goes_to_the_first(journal: Journal) -> None:
    world = World((SOLO1, VM2), slots={B: 1})

    first = migrate(world, journal)
    second = migrate(world, journal, request=MigrationRequest("vm2", A, B))

    assert (first.outcome, second.outcome) == (Outcome.DONE, Outcome.DONE_DEGRADED)
    assert world.modes("vm1") == {"lan": "primary"}
    assert world.modes("vm2") == {"lan": "standby"}


def test_two_migrations_racing_for_the_last_device_one_wins(journal_path: Path) -> None:
    """Truly concurrent: both coordinators have read the same free slot before either
    attaches (a barrier in front of b's attach); libvirt's refusal decides."""
    world = World((SOLO1, VM2), slots={B: 1})
    barrier = threading.Barrier(2, timeout=10)
    world.before[(B, "attach")] = lambda _alias: barrier.wait()
    reports: dict[str, MigrationReport | BaseException] = {}

    def run(name: str) -> None:
        with Journal(journal_path) as journal:
            try:
                reports[name] = migrate(world, journal, request=MigrationRequest(name, A, B))
            except BaseException as exc:
                reports[name] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in ("vm1", "vm2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)

    outcomes = sorted(str(getattr(r, "outcome", r)) for r in reports.values())
    assert outcomes == ["done", "done-degraded"]
    modes = [world.modes(n)["lan"] for n in ("vm1", "vm2")]
    assert sorted(modes) == ["primary", "standby"]
    attaches = [c for c in world.calls if c.where == B and c.method == "attach"]
    assert len(attaches) == 2
    holders = [n for n in ("vm1", "vm2") if "ptv-b1" in world.live_xml(n, B)]
    assert len(holders) == 1
    with Journal(journal_path) as journal:
        assert journal.open_workflows() == []


def test_a_migration_reads_each_pool_once_per_step(world: World, journal: Journal) -> None:
    """Two teams share pool lab: preflight reads it on both hosts, bind on the destination
    (each of them once, however many teams), and the domain's XML is read once per step
    where a step can (16 reads in all; 24 before the Domain object, 7 pool reads), plus
    the lease's own fresh reads (7: take and its read-back, renewals before switch, unplug
    and migrate and at the destination, release)."""
    world.calls.clear()
    assert migrate(world, journal).outcome is Outcome.DONE

    assert [c.where for c in world.calls if c.method == "network_xml"] == [A, B, B]
    assert sum(1 for c in world.calls if c.method == "domain_xml") <= 16 + 7
