"""A domain that is not as ptmig recorded it (issue 12), over the in-memory world.

Each case of host/workflow/drift.py: what migrate does with it, what the reconciler and
status say about the same domain, and that nothing waits on a device that is not there.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from workflow_fakes import POOL_SLOTS, A, B, Events, World

from host.agent_client import AgentOnDemand
from host.daemon.encode import report_message, status_message
from host.domain.domain_xml import parse_domain
from host.workflow.coordinator import Coordinator
from host.workflow.drift import TeamCase
from host.workflow.errors import PreflightError
from host.workflow.guest import Guest
from host.workflow.journal import Journal
from host.workflow.model import MigrationReport, MigrationRequest, Outcome, TeamMode, TeamStatus

REQUEST = MigrationRequest("vm1", A, B)
B_TAPS = {tap for tap, _ in POOL_SLOTS[B]}


def migrate(world: World, journal: Journal, events: Events | None = None) -> MigrationReport:
    return world.coordinator(journal).migrate(REQUEST, events or Events())


def calls(world: World, method: str) -> list[str]:
    return [c.subject for c in world.calls if c.method == method]


def step_data(journal: Journal, step: str) -> dict[str, Any]:
    """What the last workflow's *step* recorded as done."""
    (done,) = [
        s
        for s in journal.steps(journal.recent(1)[0].id)
        if s.name == step and str(s.status) == "done"
    ]
    return dict(done.data)


def recorded(world: World, uri: str) -> dict[str, str | None]:
    teams = parse_domain(world.live_xml("vm1", uri)).teams
    assert teams is not None
    return {t.name: t.primary.alias if t.primary else None for t in teams.teams}


def cases(world: World, uri: str = A, *, agent: bool = True) -> dict[str, TeamCase]:
    hv = world.connect(uri)
    dom = hv.domain("vm1")
    guest = Guest(hv, dom, AgentOnDemand(lambda: world.agent_for(dom, 15.0)))  # type: ignore[arg-type]
    try:
        state = guest.agent().state() if agent else None
        return {d.team.name: d.case for d in guest.classify(state)}
    finally:
        guest.close()


# -- the classification ----------------------------------------------------------------


def test_each_case_is_told_from_the_live_domain_not_the_record(world: World) -> None:
    assert cases(world) == {"lan": TeamCase.PLUGGED, "wan": TeamCase.PLUGGED}

    world.detach_outside("vm1", "ua-ptmig-lan-1")
    assert cases(world) == {"lan": TeamCase.PRIMARY_ABSENT, "wan": TeamCase.PLUGGED}

    world.attach_outside("vm1", 2, "ua-hand-1")
    assert cases(world)["lan"] is TeamCase.UNRECORDED

    world.attach_outside("vm1", 3, "ua-hand-2")
    assert cases(world)["lan"] is TeamCase.AMBIGUOUS


def test_the_agents_view_tells_a_team_on_its_standby(world: World, journal: Journal) -> None:
    world.coordinator(journal).failover(A, "vm1", "standby")
    assert cases(world) == {"lan": TeamCase.ON_STANDBY, "wan": TeamCase.ON_STANDBY}
    assert cases(world, agent=False) == {"lan": TeamCase.PLUGGED, "wan": TeamCase.PLUGGED}


def test_a_longer_alias_is_not_the_recorded_one(world: World) -> None:
    """ua-ptmig-lan-1 is a prefix of ua-ptmig-lan-10: the device is not there."""
    world.detach_outside("vm1", "ua-ptmig-lan-1")
    world.attach_outside("vm1", 2, "ua-ptmig-lan-10")
    hv = world.connect(A)
    assert not hv.domain("vm1").has_device("ua-ptmig-lan-1")
    assert cases(world)["lan"] is TeamCase.UNRECORDED  # lan-10 is the pool's, unrecorded


# -- migrate ---------------------------------------------------------------------------


def test_a_primary_detached_outside_ptmig_migrates_done(world: World, journal: Journal) -> None:
    world.detach_outside("vm1", "ua-ptmig-lan-1")

    report = migrate(world, journal)

    assert report.outcome is Outcome.DONE, report.error
    assert report.drift == {"lan": "primary-absent", "wan": "plugged"}
    assert dict(report_message(report).drift) == report.drift
    assert report.teams == {"lan": "primary", "wan": "primary"}
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    assert set(world.active_taps("vm1").values()) <= B_TAPS
    # No switch and no unplug for the degraded team (preflight only made its record and
    # definition say it is gone); the healthy one as always.
    assert calls(world, "UseStandby") == ["wan"]
    assert calls(world, "detach_and_wait") == ["ua-ptmig-lan-1", "ua-ptmig-wan-1"]
    assert "lan" not in step_data(journal, "unplug")["seconds"]
    # The definition sent on names none of a's devices, the stale one included.
    assert not any(tap in world.config_xml("vm1", B) for tap, _ in POOL_SLOTS[A])


def test_primaries_detached_outside_with_an_empty_destination_pool_is_done_degraded(
    journal: Journal,
) -> None:
    world = World(slots={B: 0})
    world.detach_outside("vm1", "ua-ptmig-lan-1", config=True)
    world.detach_outside("vm1", "ua-ptmig-wan-1")

    report = migrate(world, journal)

    assert report.outcome is Outcome.DONE_DEGRADED, report.error
    assert report.drift == {"lan": "primary-absent", "wan": "primary-absent"}
    assert world.running_on("vm1") == [B]
    assert world.modes("vm1") == {"lan": "standby", "wan": "standby"}
    assert calls(world, "UseStandby") == [] and step_data(journal, "unplug")["seconds"] == {}
    assert recorded(world, B) == {"lan": None, "wan": None}


def test_a_device_plugged_by_hand_is_adopted(world: World, journal: Journal) -> None:
    world.detach_outside("vm1", "ua-ptmig-lan-1", config=True)
    world.attach_outside("vm1", 2, "ua-hand-1")

    report = migrate(world, journal)

    assert report.outcome is Outcome.DONE, report.error
    assert report.drift == {"lan": "unrecorded", "wan": "plugged"}
    assert sorted(calls(world, "detach_and_wait")) == ["ua-hand-1", "ua-ptmig-wan-1"]
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    assert "ptv-a3" not in world.live_xml("vm1", B)


def test_two_devices_plugged_by_hand_are_refused_naming_them(
    world: World, journal: Journal
) -> None:
    world.detach_outside("vm1", "ua-ptmig-lan-1")
    world.attach_outside("vm1", 2, "ua-hand-1")
    world.attach_outside("vm1", 3, "ua-hand-2")
    world.modes("vm1")  # the guest's kernel has seen the devices go and come
    before = world.snapshot()

    with pytest.raises(PreflightError) as caught:
        migrate(world, journal)

    message = str(caught.value)
    assert "\n" not in message
    assert "team lan" in message and "ua-hand-1, ua-hand-2" in message
    assert world.snapshot() == before
    assert world.mutations() == []


def test_a_team_the_agent_has_on_its_standby_is_not_switched(
    world: World, journal: Journal
) -> None:
    world.coordinator(journal).failover(A, "vm1", "standby")
    world.calls.clear()

    report = migrate(world, journal)

    assert report.outcome is Outcome.DONE, report.error
    assert report.drift == {"lan": "on-standby", "wan": "on-standby"}
    assert calls(world, "UseStandby") == []
    assert sorted(calls(world, "detach_and_wait")) == ["ua-ptmig-lan-1", "ua-ptmig-wan-1"]
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}


# -- rollback --------------------------------------------------------------------------


def test_a_rollback_leaves_a_degraded_team_degraded_and_is_rolled_back(
    world: World, journal: Journal
) -> None:
    world.detach_outside("vm1", "ua-ptmig-lan-1")
    world.fail(A, "migrate")

    report = migrate(world, journal)

    assert report.outcome is Outcome.ROLLED_BACK, report.error
    assert world.running_on("vm1") == [A]
    assert world.modes("vm1") == {"lan": "standby", "wan": "primary"}
    assert "lan" not in calls(world, "BindPrimary")  # nothing bound for lan's gone device
    assert recorded(world, A)["lan"] is None  # the record says what the domain has


def test_a_switch_back_never_waits_for_a_device_that_is_gone(
    world: World, journal: Journal
) -> None:
    """The operator unplugs wan's primary after the switch; lan's unplug then fails."""
    events = Events({("switch", "done"): lambda: world.detach_outside("vm1", "ua-ptmig-wan-1")})
    world.fail(A, "detach_and_wait", subject="ua-ptmig-lan-1")

    report = migrate(world, journal, events)

    assert report.outcome is Outcome.ROLLED_BACK, report.error
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    # wan got a device plugged anew; no bind asked for the one that was gone.
    assert any(
        "recorded primary ua-ptmig-wan-1 is not plugged; plugging another" in e.message
        for e in events.events
    )
    wan = recorded(world, A)["wan"]
    hv = world.connect(A)
    assert wan is not None and hv.domain("vm1").has_device(wan)
    assert sorted(calls(world, "BindPrimary")) == ["lan", "wan"]


def test_a_failed_compensation_logs_one_line_without_traceback(
    journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    world = World(slots={A: 2})
    world.fail(A, "migrate")
    world.fail(A, "attach", every=True)  # the re-plug finds no device it can plug

    with caplog.at_level(logging.INFO):
        report = migrate(world, journal)

    assert report.outcome is Outcome.FAILED
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("compensation of unplug failed" in r.getMessage() for r in errors)
    assert all(r.exc_info is None for r in errors)


# -- the reconciler and status see the same -------------------------------------------


def test_status_and_the_reconciler_agree_with_preflight(world: World, journal: Journal) -> None:
    coordinator: Coordinator = world.coordinator(journal)
    world.detach_outside("vm1", "ua-ptmig-lan-1")

    status = coordinator.status(A, "vm1")
    teams = {t.name: t for t in status.teams}
    lan = teams["lan"]
    assert (lan.mode, lan.case) == (TeamMode.DEGRADED, "primary-absent")
    assert lan.drift.startswith("recorded primary ua-ptmig-lan-1 is not plugged")
    assert teams["wan"].drift == ""
    # The API's status message carries the same line.
    api = {t.name: t for t in status_message(status).teams}
    assert api["lan"].drift == lan.drift and api["wan"].drift == ""
    assert api["lan"].case == "primary-absent"

    repaired = coordinator.reconcile(A)

    assert [(r.domain_uuid, r.teams) for r in repaired] == [
        (world.find("vm1", A).uuid, {"lan": "primary", "wan": "primary"})  # type: ignore[union-attr]
    ]
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    after = {t.name: t for t in coordinator.status(A, "vm1").teams}
    assert after["lan"].drift == ""


def team_status(coordinator: Coordinator, name: str) -> TeamStatus:
    return next(t for t in coordinator.status(A, "vm1").teams if t.name == name)


def test_the_reconciler_leaves_an_ambiguous_team_to_a_person(
    world: World, journal: Journal
) -> None:
    coordinator = world.coordinator(journal)
    world.detach_outside("vm1", "ua-ptmig-lan-1")
    world.attach_outside("vm1", 2, "ua-hand-1")
    world.attach_outside("vm1", 3, "ua-hand-2")
    world.modes("vm1")  # the guest's kernel has seen the devices go and come
    before = world.snapshot()

    assert coordinator.reconcile(A) == []
    assert world.snapshot() == before
    lan = team_status(coordinator, "lan")
    assert (lan.mode, lan.case) == (TeamMode.DEGRADED, "ambiguous")
    assert "ua-hand-1, ua-hand-2" in lan.drift


def test_the_reconciler_adopts_a_device_plugged_by_hand(world: World, journal: Journal) -> None:
    coordinator = world.coordinator(journal)
    world.detach_outside("vm1", "ua-ptmig-lan-1")
    world.attach_outside("vm1", 2, "ua-hand-1")
    lan = team_status(coordinator, "lan")
    assert (lan.mode, lan.case) == (TeamMode.STANDBY, "unrecorded")  # not in the bond yet
    assert lan.drift.startswith("device ua-hand-1 of pool lab is plugged but not recorded")

    coordinator.reconcile(A)

    assert recorded(world, A)["lan"] == "ua-hand-1"
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    assert world.active_taps("vm1")["lan"] == "ptv-a3"


def test_a_device_ptmig_plugged_but_could_not_record_is_its_teams(
    journal: Journal,
) -> None:
    """The destination's libvirtd restarted between a bind's attach and its metadata
    write: both teams of the pool lack a primary and one device is plugged, unrecorded.
    Its alias is ptmig's for lan, so it is lan's (adopted), not an ambiguity that would
    leave both teams degraded for a person; wan gets a device of its own."""
    world = World(slots={B: 0})
    coordinator = world.coordinator(journal)
    assert migrate(world, journal).outcome is Outcome.DONE_DEGRADED
    world.set_slots(B, 4)
    world.attach_outside("vm1", 0, "ua-ptmig-lan-2", uri=B)
    world.modes("vm1")  # the guest's kernel has seen the device come

    assert cases(world, B) == {"lan": TeamCase.UNRECORDED, "wan": TeamCase.NO_PRIMARY}
    (repaired,) = coordinator.reconcile(B)

    assert not repaired.error and repaired.teams == {"lan": "primary", "wan": "primary"}
    assert recorded(world, B)["lan"] == "ua-ptmig-lan-2"
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
