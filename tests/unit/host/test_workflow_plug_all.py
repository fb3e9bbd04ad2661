"""The bind step's one plug for every team and its parallel binds (Guest.plug_and_bind_all),
and the same for the rollback's replug, over the in-memory world (workflow_fakes)."""

from __future__ import annotations

import threading

from test_workflow_migration import (
    B_TAPS,
    REQUEST,
    assert_on_devices_of,
    device_aliases,
    migrate,
    teams_on,
)
from workflow_fakes import A, B, Call, Events, World

from host.hypervisor import HypervisorError
from host.workflow.coordinator import Coordinator, Reconciler
from host.workflow.journal import Journal
from host.workflow.model import MigrationReport, Outcome, TeamMode

#: Both teams' devices attached back to back, recorded in one write, then both bound.
ONE_PLUG_STEP = ["attach", "attach", "set_metadata", "BindPrimary", "BindPrimary"]


def migrate_degraded(coordinator: Coordinator) -> MigrationReport:
    """vm1 from A to B with nothing free on B: both teams left on their standbys."""
    return coordinator.migrate(REQUEST)


def bind_step_calls(world: World) -> Events:
    """Events that clear the world's calls as the bind step starts: what is left is its."""
    return Events({("bind", "started"): world.calls.clear})


def plug_and_bind_calls(calls: list[Call], uri: str) -> list[tuple[str, str]]:
    return [
        (c.method, c.subject)
        for c in calls
        if (c.where, c.method) in ((uri, "attach"), (uri, "set_metadata"), ("agent", "BindPrimary"))
    ]


def test_every_teams_device_is_plugged_and_recorded_before_any_bind(
    world: World, journal: Journal
) -> None:
    """One step: both attaches back to back, one metadata write for both, then the binds."""
    report = migrate(world, journal, bind_step_calls(world))

    assert report.outcome is Outcome.DONE, report.error
    calls = plug_and_bind_calls(world.calls, B)
    assert [m for m, _ in calls] == ONE_PLUG_STEP
    assert sorted(s for m, s in calls if m == "BindPrimary") == ["lan", "wan"]
    assert_on_devices_of(world, B, B_TAPS)


def test_the_teams_are_bound_at_the_same_time(world: World, journal: Journal) -> None:
    """Each BindPrimary waits for the other to be in flight: one after the other, the
    first would wait for ever (the barrier's timeout breaks it and the team degrades)."""
    both = threading.Barrier(2, timeout=10)
    world.agent_before[("vm1", "BindPrimary")] = lambda _team, _timeout: both.wait() and None

    report = migrate(world, journal)

    assert report.outcome is Outcome.DONE, report.error
    assert report.teams == {"lan": "primary", "wan": "primary"}
    assert not both.broken


def test_each_bind_is_timed_on_the_coordinators_clock(world: World, journal: Journal) -> None:
    report = migrate(world, journal)

    assert sorted(report.binds) == ["lan", "wan"]
    for timing in report.binds.values():
        assert timing.device_added is not None
        assert timing.attach_called <= timing.device_added  # before or after the call returns
        assert timing.attach_returned <= timing.bind_called <= timing.bound
    # the second attach follows the first at once: no bind or metadata write between
    lan, wan = report.binds["lan"], report.binds["wan"]
    assert lan.attach_returned <= wan.attach_called < lan.bind_called


def test_a_failed_plug_of_one_team_leaves_the_others_device_recorded_and_bound(
    world: World, journal: Journal
) -> None:
    """wan's attach raises what is no claim lost (a defect, a broken connection): wan
    stays on its standby with the reason, lan's device is recorded and bound."""
    events = Events(
        {("bind", "started"): lambda: world.fail(B, "attach", RuntimeError("boom"), nth=2)}
    )

    report = migrate(world, journal, events)

    assert report.outcome is Outcome.DONE_DEGRADED, report.error
    assert report.teams == {"lan": "primary", "wan": "standby"}
    assert teams_on(world, B)["wan"] is None and teams_on(world, B)["lan"] in B_TAPS
    for xml in (world.live_xml("vm1", B), world.config_xml("vm1", B)):
        assert device_aliases(xml) == ["ua-ptmig-lan-1"]
    bind = [e.message for e in events.events if (e.phase, e.state) == ("bind", "info")]
    assert any("team wan: plug failed: boom" in m for m in bind), bind


def test_devices_whose_record_cannot_be_written_are_unplugged_again(
    world: World, journal: Journal
) -> None:
    """The one metadata write fails: no device stays attached that no record names."""
    events = Events(
        {("bind", "started"): lambda: world.fail(B, "set_metadata", HypervisorError("full", 1))}
    )

    report = migrate(world, journal, events)

    assert report.outcome is Outcome.DONE_DEGRADED, report.error
    assert report.teams == {"lan": "standby", "wan": "standby"}
    assert teams_on(world, B) == {"lan": None, "wan": None}
    for xml in (world.live_xml("vm1", B), world.config_xml("vm1", B)):
        assert device_aliases(xml) == []
    assert not [c for c in world.calls if (c.where, c.method) == ("agent", "BindPrimary")][2:]


def test_the_rollbacks_replug_plugs_every_team_in_one_step(world: World, journal: Journal) -> None:
    """A failed migration: both teams' source devices attached and recorded in one go,
    then bound, as the bind step does on the destination."""
    events = Events({("unplug", "done"): world.calls.clear})
    world.fail(A, "migrate")

    report = migrate(world, journal, events)

    assert report.outcome is Outcome.ROLLED_BACK, report.error
    calls = plug_and_bind_calls(world.calls, A)
    # (the switch's undo binds the replugged primaries once more after: its own step)
    assert [m for m, _ in calls][:5] == ONE_PLUG_STEP
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}


def test_failover_to_primary_plugs_every_team_in_one_step(journal: Journal) -> None:
    """Both teams degraded on B (no free device at the migration): a failover once
    devices are free attaches both back to back, records them once, then binds."""
    world = World(slots={B: 0})
    coordinator = world.coordinator(journal)
    assert migrate_degraded(coordinator).outcome is Outcome.DONE_DEGRADED
    world.set_slots(B, 2)
    world.calls.clear()

    result = coordinator.failover(B, "vm1", TeamMode.PRIMARY)

    assert result.teams == {"lan": "primary", "wan": "primary"}
    assert [m for m, _ in plug_and_bind_calls(world.calls, B)] == ONE_PLUG_STEP
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}


def test_failover_binds_a_recorded_primary_and_plugs_the_missing_one_together(
    world: World, journal: Journal
) -> None:
    """lan's recorded device is still plugged (bind only); wan's is gone (plugged anew):
    the two binds are in flight at once."""
    coordinator = world.coordinator(journal)
    coordinator.failover(A, "vm1", TeamMode.STANDBY)
    world.connect(A).domain("vm1").detach_and_wait("ua-ptmig-wan-1", 5)
    both = threading.Barrier(2, timeout=10)
    world.agent_before[("vm1", "BindPrimary")] = lambda _team, _timeout: both.wait() and None
    world.calls.clear()

    result = coordinator.failover(A, "vm1", TeamMode.PRIMARY)

    assert result.teams == {"lan": "primary", "wan": "primary"}, result.why
    assert not both.broken
    attached = [s for m, s in plug_and_bind_calls(world.calls, A) if m == "attach"]
    assert len(attached) == 1, "only wan's device is plugged"


def test_the_reconciler_plugs_every_degraded_team_in_one_step(journal: Journal) -> None:
    world = World(slots={B: 0})
    coordinator = world.coordinator(journal)
    migrate_degraded(coordinator)
    world.set_slots(B, 2)
    world.calls.clear()

    repaired = Reconciler(coordinator, [B], interval=0.0).run_once()

    assert [r.teams for r in repaired] == [{"lan": "primary", "wan": "primary"}]
    assert [m for m, _ in plug_and_bind_calls(world.calls, B)] == ONE_PLUG_STEP
