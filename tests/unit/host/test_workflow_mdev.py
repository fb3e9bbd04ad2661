"""A domain's mediated device (the kernel's mtty, a serial port) through a migration over
the in-memory world: no team's, carried by QEMU's state copy onto a free mdev of the
destination's pool of the same name, its UUID rewritten in the destination's and the
persistent XML (host/workflow/hybrid.py); refused in preflight, nothing changed, when it
cannot be carried."""

from __future__ import annotations

import libvirt
import pytest
from fake_specs import VM2
from workflow_fakes import LAN, A, B, C, Events, World

from host.domain.devices import mdev_hostdev_xml
from host.domain.domain_xml import parse_domain
from host.domain.pools import (
    MdevPool,
    MdevSlot,
    format_pool_network,
    free_slots,
    parse_pool_network,
)
from host.workflow.errors import PreflightError
from host.workflow.evacuation import Candidate, place
from host.workflow.journal import Journal
from host.workflow.model import (
    EvacuationOutcome,
    EvacuationRequest,
    EvacuationTarget,
    MigrationReport,
    MigrationRequest,
    Outcome,
)

A_MDEV = "6a1c9a6e-0000-4000-8000-00000000000a"
B_MDEV = "6a1c9a6e-0000-4000-8000-00000000000b"
B_MDEV2 = "6a1c9a6e-0000-4000-8000-0000000000b2"
SERIAL = "ptmig-pool-serial"


def define(world: World, uri: str, *uuids: str, copy: bool = True, kind: str = "mtty-2") -> None:
    pool = MdevPool("serial", kind, uuids, state_copy=copy or None)
    world.hosts[uri].networks[SERIAL] = format_pool_network(pool)


def mdev_world(
    *, b_uuids: tuple[str, ...] = (B_MDEV,), copy_on_b: bool = True, hosts: tuple[str, ...] = (A, B)
) -> World:
    """vm1 on A (teams lan and wan on emulated NICs) holding A's mdev A_MDEV; pool serial on
    both hosts, marked state-copy; the mtty's driver implements VFIO migration."""
    world = World(hosts=hosts)
    define(world, A, A_MDEV)
    define(world, B, *b_uuids, copy=copy_on_b)
    world.state_copyable |= {A_MDEV, *b_uuids}
    world.connect(A).domain("vm1").attach(mdev_hostdev_xml(alias="ua-serial0", uuid=A_MDEV))
    return world


def mdevs(world: World, uri: str, *, inactive: bool = False) -> list[str]:
    hv = world.connect(uri)
    return [m.uuid for m in parse_domain(hv.domain("vm1").xml(inactive=inactive)).mdevs]


def free_on(world: World, uri: str) -> list[str]:
    """Pool serial's free mdevs on *uri*, as ``ptmig pools`` counts them."""
    hv = world.connect(uri)
    xml = hv.network_xml(SERIAL)
    assert xml is not None
    pool = parse_pool_network(xml)
    return [s.uuid for s in free_slots(pool, hv.all_domain_xml()) if isinstance(s, MdevSlot)]


def migrate(world: World, journal: Journal, **kw: object) -> MigrationReport:
    request = MigrationRequest("vm1", A, B, **kw)  # type: ignore[arg-type]
    return world.coordinator(journal).migrate(request, Events())


def test_the_mdev_is_carried_onto_a_free_one_of_the_destinations_pool(journal: Journal) -> None:
    world = mdev_world()
    assert free_on(world, B) == [B_MDEV]
    report = migrate(world, journal)
    assert report.outcome is Outcome.DONE, report.error
    assert report.devices[A_MDEV].startswith("copy-state: pool serial (mtty-2)")
    assert report.devices[A_MDEV].endswith(f"its state goes to {B_MDEV}")
    # the teams switched as always; the mdev was never unplugged
    assert report.ways["lan"].startswith("switch: ")
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    unplugged = [c.subject for c in world.calls if c.method == "detach_and_wait"]
    assert unplugged == ["ua-ptmig-lan-1", "ua-ptmig-wan-1"]
    # libvirt was asked to start and define the domain on B's mdev, alias kept
    params = world.migrations[-1].params
    for key in (libvirt.VIR_MIGRATE_PARAM_DEST_XML, libvirt.VIR_MIGRATE_PARAM_PERSIST_XML):
        (mdev,) = parse_domain(params[key]).mdevs
        assert (mdev.uuid, mdev.alias) == (B_MDEV, "ua-serial0")
    assert mdevs(world, B) == [B_MDEV]
    assert mdevs(world, B, inactive=True) == [B_MDEV]
    # the claim moved: A's mdev is free again, B's is held
    assert free_on(world, A) == [A_MDEV]
    assert free_on(world, B) == []
    steps = [s.name for s in journal.steps(report.workflow_id) if str(s.status) == "done"]
    assert "state-check" in steps


def test_an_mdev_held_by_another_domain_on_the_destination_is_not_chosen(
    journal: Journal,
) -> None:
    world = mdev_world(b_uuids=(B_MDEV, B_MDEV2))
    world.add_guest(VM2, B)
    world.connect(B).domain("vm2").attach(mdev_hostdev_xml(alias="ua-other", uuid=B_MDEV))
    assert free_on(world, B) == [B_MDEV2]
    report = migrate(world, journal)
    assert report.outcome is Outcome.DONE, report.error
    assert mdevs(world, B) == [B_MDEV2]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda w: w.hosts[A].networks.pop(SERIAL), "in no mdev pool on this host"),
        (lambda w: define(w, A, A_MDEV, copy=False), "here is not marked state-copy"),
        (lambda w: define(w, B, B_MDEV, copy=False), "not an mdev pool marked state-copy"),
        (lambda w: w.hosts[B].networks.pop(SERIAL), "not an mdev pool marked state-copy"),
        (lambda w: define(w, B, B_MDEV, kind="mtty-1"), "type mtty-2 here and mtty-1"),
        (lambda w: w.state_copyable.discard(A_MDEV), f"QEMU blocks it: {A_MDEV}: VFIO"),
        (lambda w: w.blockers.update(vm1=["vIOMMU"]), "QEMU blocks the VM: vIOMMU"),
        (lambda w: define(w, B), "no free mdev in pool serial on the destination"),
    ],
)
def test_an_mdev_that_cannot_be_carried_refuses_the_migration_and_changes_nothing(
    journal: Journal, change: object, why: str
) -> None:
    world = mdev_world()
    change(world)  # type: ignore[operator]
    before = world.snapshot()
    with pytest.raises(PreflightError, match=f"mdev {A_MDEV}: .*{why}"):
        migrate(world, journal)
    assert world.snapshot() == before
    assert world.running_on("vm1") == [A]
    assert mdevs(world, A) == [A_MDEV]


def test_a_failed_migration_leaves_the_mdev_on_the_source_and_the_destinations_free(
    journal: Journal,
) -> None:
    world = mdev_world()
    world.fail(A, "migrate")
    report = migrate(world, journal)
    assert report.outcome is Outcome.ROLLED_BACK, report.error
    assert world.running_on("vm1") == [A]
    assert mdevs(world, A) == [A_MDEV]
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    # nothing was plugged on B to undo: the mdev chosen there is free again
    assert free_on(world, B) == [B_MDEV]


def test_a_blocker_left_after_the_unplug_rolls_back_since_an_mdev_cannot_switch(
    journal: Journal,
) -> None:
    world = mdev_world()

    class AfterUnplug(dict[str, list[str]]):
        def get(self, key: str, default: object = None) -> list[str]:  # type: ignore[override]
            unplugged = any(c.method == "detach_and_wait" for c in world.calls)
            return ["VFIO migration is not supported with vIOMMU"] if unplugged else []

    world.blockers = AfterUnplug()
    report = migrate(world, journal)
    assert report.outcome is Outcome.ROLLED_BACK, report.error
    assert "cannot be switched" in report.error
    assert world.running_on("vm1") == [A]
    assert mdevs(world, A) == [A_MDEV]
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}


def test_forcing_the_switch_of_a_team_the_domain_lacks_is_refused(journal: Journal) -> None:
    world = World()
    before = world.snapshot()
    with pytest.raises(PreflightError, match=r"no team nope in vm1 to force the switch of"):
        migrate(world, journal, switch_teams=("nope",))
    assert world.snapshot() == before


def test_a_hybrid_refusal_leaves_even_a_drifted_record_as_it_was(journal: Journal) -> None:
    """Preflight corrects a team's record only once every check passed, the hybrid's too."""
    world = mdev_world()
    world.connect(A).domain("vm1").detach_and_wait("ua-ptmig-lan-1", 5)  # lan: primary-absent
    define(world, B, B_MDEV, copy=False)
    assert world.modes("vm1")["lan"] == "standby"  # the guest saw its NIC go
    before = world.snapshot()
    with pytest.raises(PreflightError, match="not an mdev pool marked state-copy"):
        migrate(world, journal)
    assert world.snapshot() == before
    teams = parse_domain(world.live_xml("vm1", A)).teams
    assert teams is not None and teams.team("lan").primary is not None  # still recorded


def test_a_team_naming_an_mdev_pool_is_refused(journal: Journal) -> None:
    world = World()
    for uri, uuid in ((A, A_MDEV), (B, B_MDEV)):
        world.hosts[uri].networks[f"ptmig-pool-{LAN.pool}"] = format_pool_network(
            MdevPool(LAN.pool, "mtty-2", (uuid,), state_copy=True)
        )
    before = world.snapshot()
    with pytest.raises(PreflightError, match="holds mediated devices, which are no team's"):
        migrate(world, journal)
    assert world.snapshot() == before


def test_status_says_whether_the_mdev_could_be_carried(journal: Journal) -> None:
    from host.commandline.render import status_text
    from host.daemon.encode import status_message

    world = mdev_world()
    coordinator = world.coordinator(journal)
    status = coordinator.status(A, "vm1")
    assert status.devices[A_MDEV].startswith(
        "copy-state if the destination agrees: pool serial (mtty-2) is marked state-copy here"
    )
    assert f"  mdev {A_MDEV}: {status.devices[A_MDEV]}" in status_text(status).splitlines()
    assert dict(status_message(status).devices) == status.devices
    define(world, A, A_MDEV, copy=False)
    assert coordinator.status(A, "vm1").devices == {
        A_MDEV: "refused at migrate: pool serial here is not marked state-copy"
    }
    world.hosts[A].networks.pop(SERIAL)
    assert coordinator.status(A, "vm1").devices == {
        A_MDEV: "refused at migrate: in no mdev pool on this host"
    }
    assert World().coordinator(journal).status(A, "vm1").devices == {}


# -- evacuation: a target must take every mediated device --------------------------------

C_MDEV = "6a1c9a6e-0000-4000-8000-00000000000c"


def test_an_evacuation_places_a_domain_where_its_mdev_has_a_free_one(journal: Journal) -> None:
    """B is first in the targets' order and takes both teams, but its pool serial lists no
    mdev; C has a free one: the domain goes to C and its mdev is carried there."""
    world = mdev_world(hosts=(A, B, C))
    world.set_slots(C, 2)
    define(world, C, C_MDEV)
    world.state_copyable.add(C_MDEV)
    define(world, B)  # pool serial on B lists no mdev at all
    request = EvacuationRequest(A, (EvacuationTarget(B), EvacuationTarget(C)))
    report = world.coordinator(journal).evacuate(request)
    (moved,) = report.domains
    assert (moved.destination_uri, moved.outcome) == (C, EvacuationOutcome.DONE), moved.error
    assert mdevs(world, C) == [C_MDEV]


def test_placement_puts_a_target_short_of_a_carried_mdev_last() -> None:
    vm = Candidate("vm", "u", ("lan",), carried=("serial", "serial"))
    targets = (EvacuationTarget(B), EvacuationTarget(C))
    free = {B: {"lan": 1, "serial": 1}, C: {"serial": 2}}
    (p,) = place([vm], targets, free, False)
    assert p.target == EvacuationTarget(C) and p.fits == 0  # its team degrades there
    # the next domain with an mdev finds C's taken by the first
    first, second = place([vm, Candidate("vm2", "v", ("lan",), ("serial",))], targets, free, False)
    assert (first.target, second.target) == (EvacuationTarget(C), EvacuationTarget(B))
