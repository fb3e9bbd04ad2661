"""The hybrid migration over the in-memory world: team lan on an emulated NIC (always
switched), team wan on a whole PCI NIC of pool ``nics``, whose state QEMU copies when the
pool says so on both hosts and QEMU names no blocker (host/workflow/hybrid.py)."""

from __future__ import annotations

import libvirt
import pytest
from fake_specs import TeamSpec
from workflow_fakes import LAN, A, B, Events, GuestSpec, World

from host.domain.domain_xml import parse_domain
from host.domain.pools import PciPool, format_pool_network
from host.workflow.journal import Journal
from host.workflow.model import MigrationReport, MigrationRequest, Outcome, TeamMode

A_NIC, B_NIC = "0000:03:00.0", "0000:07:00.0"
WAN = TeamSpec("wan", "bond1", "preserve", "52:54:00:aa:00:02", "ptv-wstandby", None, "nics")
VM = GuestSpec("vm1", "6f1c4f0e-2d2b-4a8e-9d0c-1b2a3c4d5e01", (LAN, WAN))


def hybrid_world(journal: Journal, *, copy_on_b: bool = True, copyable: bool = True) -> World:
    """vm1 on A; wan's primary the PCI NIC A_NIC, plugged and bound through ptmig's own path."""
    world = World((VM,))
    for uri, nic, marked in ((A, A_NIC, True), (B, B_NIC, copy_on_b)):
        pool = PciPool("nics", (nic,), state_copy=marked or None)
        world.hosts[uri].networks["ptmig-pool-nics"] = format_pool_network(pool)
    if copyable:
        world.state_copyable |= {A_NIC, B_NIC}
    runtime = world.coordinator(journal).runtime
    guest = runtime.guest(world.connect(A), "vm1")  # type: ignore[arg-type]
    wan = guest.teams().team("wan")
    result = guest.plug_and_bind_all([wan], lambda _: "setup", 5, lambda _m: None)["wan"]
    assert result.result is TeamMode.PRIMARY
    guest.close()
    return world


def wan_nic(world: World, uri: str) -> str | None:
    info = parse_domain(world.live_xml("vm1", uri))
    return next((h.host_pci_address for h in info.hostdevs), None)


def migrate(world: World, journal: Journal, **kw: object) -> MigrationReport:
    request = MigrationRequest("vm1", A, B, **kw)  # type: ignore[arg-type]
    return world.coordinator(journal).migrate(request, Events())


def test_a_state_copyable_nic_stays_plugged_and_only_the_other_team_switches(
    journal: Journal,
) -> None:
    world = hybrid_world(journal)
    report = migrate(world, journal)
    assert report.outcome is Outcome.DONE, report.error
    assert report.ways["wan"].startswith("copy-state: ")
    assert report.ways["lan"].startswith("switch: ")
    # wan's NIC was never unplugged: the guest's bond never left it, and on B the domain
    # holds B's device, which the record names
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    assert wan_nic(world, B) == B_NIC
    teams = parse_domain(world.live_xml("vm1", B)).teams
    assert teams is not None
    primary = teams.team("wan").primary
    assert primary is not None and primary.pci_address == B_NIC
    unplugged = [c.subject for c in world.calls if c.method == "detach_and_wait"]
    assert unplugged == ["ua-ptmig-lan-1"]
    # libvirt was asked to start the destination on B's NIC and to define it with B's NIC
    params = world.migrations[-1].params
    for key in (libvirt.VIR_MIGRATE_PARAM_DEST_XML, libvirt.VIR_MIGRATE_PARAM_PERSIST_XML):
        assert [h.host_pci_address for h in parse_domain(params[key]).hostdevs] == [B_NIC]
    steps = [s.name for s in journal.steps(report.workflow_id) if str(s.status) == "done"]
    assert "state-check" in steps


@pytest.mark.parametrize(
    ("world_kw", "request_kw", "why"),
    [
        ({"copy_on_b": False}, {}, "on the destination is not a pci pool marked state-copy"),
        ({"copyable": False}, {}, "QEMU blocks it"),
        ({}, {"switch_all": True}, "forced by the operator, for every team"),
        ({}, {"switch_teams": ("wan",)}, "forced by the operator, for this team"),
    ],
)
def test_without_every_condition_the_nic_is_switched_and_unplugged_as_always(
    journal: Journal, world_kw: dict[str, bool], request_kw: dict[str, object], why: str
) -> None:
    world = hybrid_world(journal, **world_kw)
    report = migrate(world, journal, **request_kw)
    assert report.outcome is Outcome.DONE, report.error
    assert report.ways["wan"] == f"switch: {why}" or why in report.ways["wan"]
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    assert wan_nic(world, B) == B_NIC  # plugged after the move, from B's pool
    steps = [s.name for s in journal.steps(report.workflow_id)]
    assert "state-check" not in steps


class LateBlocker(dict[str, list[str]]):
    """A blocker for the VM that names no device and shows only once lan's NIC is gone,
    for as long as a VFIO device is plugged (as QEMU's vIOMMU check would)."""

    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world

    def get(self, key: str, default: object = None) -> list[str]:  # type: ignore[override]
        world = self.world
        unplugged = any(c.method == "detach_and_wait" for c in world.calls)
        records = [r for h in world.hosts.values() for r in h.domains.values() if r.active]
        plugged = any(parse_domain(world.xml(r)).hostdevs for r in records)
        return ["VFIO migration is not supported with vIOMMU"] if unplugged and plugged else []


def test_a_blocker_left_after_the_unplug_switches_the_kept_nic_before_the_migration(
    journal: Journal,
) -> None:
    world = hybrid_world(journal)
    world.blockers = LateBlocker(world)
    report = migrate(world, journal)
    assert report.outcome is Outcome.DONE, report.error
    assert "QEMU still blocks the VM" in report.ways["wan"]
    assert report.ways["wan"].startswith("switch: ")
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
    assert wan_nic(world, B) == B_NIC


def test_a_rollback_after_the_late_switch_puts_both_teams_back_on_the_source(
    journal: Journal,
) -> None:
    world = hybrid_world(journal)
    world.blockers = LateBlocker(world)
    world.fail(A, "migrate")
    report = migrate(world, journal)
    assert report.outcome is Outcome.ROLLED_BACK, report.error
    assert world.running_on("vm1") == [A]
    assert wan_nic(world, A) == A_NIC
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}


def test_a_failed_migration_leaves_the_kept_nic_plugged_on_the_source(journal: Journal) -> None:
    world = hybrid_world(journal)
    world.fail(A, "migrate")
    report = migrate(world, journal)
    assert report.outcome is Outcome.ROLLED_BACK, report.error
    assert report.ways["wan"].startswith("copy-state: ")
    assert world.running_on("vm1") == [A]
    assert wan_nic(world, A) == A_NIC
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}


def test_with_no_pool_marked_state_copy_the_report_says_nothing_new(journal: Journal) -> None:
    world = hybrid_world(journal)
    world.hosts[A].networks["ptmig-pool-nics"] = format_pool_network(PciPool("nics", (A_NIC,)))
    report = migrate(world, journal)
    assert report.outcome is Outcome.DONE, report.error
    assert report.ways == {}
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}


def test_status_says_a_team_on_a_state_copy_pool_may_stay_plugged(journal: Journal) -> None:
    world = hybrid_world(journal)
    status = world.coordinator(journal).status(A, "vm1")
    ways = {t.name: t.way for t in status.teams}
    assert ways["wan"].startswith("copy-state if the destination agrees: pool nics")
    assert ways["lan"] == ""  # an emulated pool: nothing new to say


def test_a_destination_device_taken_meanwhile_fails_the_migration_and_it_rolls_back(
    journal: Journal,
) -> None:
    """The claim of a state-copied NIC's destination device is the migration itself."""
    from fake_specs import VM2

    from host.domain.devices import pci_hostdev_xml

    world = hybrid_world(journal)

    def take_it(_subject: str) -> None:
        world.before.pop((A, "migrate"))
        world.add_guest(VM2, B)
        world.connect(B).domain("vm2").attach(pci_hostdev_xml(alias="ua-other", pci_address=B_NIC))

    world.before[(A, "migrate")] = take_it
    report = migrate(world, journal)
    assert report.outcome is Outcome.ROLLED_BACK, report.error
    assert "in use" in report.error
    assert world.running_on("vm1") == [A]
    assert wan_nic(world, A) == A_NIC
    assert world.modes("vm1") == {"lan": "primary", "wan": "primary"}
