"""The hybrid path in the nested vfio lab (issue 26): an L2 guest holding an ``mtty`` mdev
and team lan on a real igb VF; ``ptmig migrate`` unplugs only the VF, QEMU copies the
mdev's state onto the destination's own mdev.

L1 boots Debian's generic 6.12 with the ``mtty`` sample (lab.nested.kernel), whatever
``$PTMIG_VLAB_L1_KERNEL`` says.  Both hosts share L1's kernel, so each offers its own
mdevs (lab.nested.mdev.host_uuids: one for the guest and a spare) in its ``serial`` pool.
The state is proved three ways: a marker written into the UART's scratch register on the
source reads back on the destination (a fresh mdev reads 0); QEMU's ``VFIO_MIGRATION``
events (``migration-events=on``) show the source's device in stop-copy and the
destination's resuming; and the mdev never leaves the domain, its UUID rewritten.
Slow (L1 under TCG): marker ``vfio``; docs/lab.md has the command.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import libvirt
import pytest
from test_vfio import OTHER, check_vf, l1_driver

from host.domain.devices import mdev_hostdev_xml
from host.domain.domain_xml import parse_domain
from host.hypervisor.events import ensure_event_loop
from host.workflow.model import Outcome, TeamMode
from lab.guest import DOMAIN_NAME
from lab.migration import PtmigMigration
from lab.nested import LIBVIRT_PORTS, mdev
from lab.nested import coordinated as co
from lab.nested.vlab import VfioLab

pytestmark = [pytest.mark.e2e, pytest.mark.vfio]

UUIDS = {host: mdev.host_uuids(host) for host in LIBVIRT_PORTS}


def remove_mdevs(lab: VfioLab) -> list[str]:
    """L2 stopped (an mdev in use cannot be removed), every mdev of L1 removed; what is
    left in /sys/bus/mdev/devices."""
    for host in LIBVIRT_PORTS:
        with contextlib.suppress(libvirt.libvirtError):
            dom = lab.domain(host)
            if dom.isActive():
                dom.destroy()
    return lab.l1_exec(mdev.remove_command(), timeout=60).check().split()


@pytest.fixture(scope="module")
def hlab() -> Iterator[VfioLab]:
    # before the lab's first libvirt connection: QEMU's events reach only those opened after
    ensure_event_loop()
    lab = VfioLab(l1_kernel="6.12")
    left: list[str] | None = None
    try:
        lab.up(boot_guest=False)
        assert lab.state.mtty, f"L1 ({lab.state.l1_kernel}) has no mtty parent"
        undecoded = [h for h, d in lab.state.hosts.items() if not d.vf_bar_decodes]
        assert not undecoded, f"the igb VFs of {undecoded} do not decode (docs/lab.md)"
        for uuids in UUIDS.values():
            lab.l1_exec(mdev.create_command(uuids)).check()
        co.define_pools(lab)
        co.define_mdev_pools(lab, UUIDS, mdev.MTTY_TYPE)
        lab.boot_guest(
            extra_devices=mdev_hostdev_xml(alias=mdev.MDEV_ALIAS, uuid=UUIDS["hosta"][0]),
            qemu_override=mdev.override_xml(),
        )
        live = lab.domain("hosta").XMLDesc(0)
        assert "<iommu" not in live, "a vIOMMU in L2 would block every VFIO state copy"
        yield lab
    finally:
        with contextlib.suppress(Exception):  # L1 may never have come up
            left = remove_mdevs(lab)
        lab.down()
    assert left == [], f"mdevs left in L1 after the module: {left}"


@pytest.fixture(scope="module")
def events(hlab: VfioLab) -> Iterator[mdev.VfioMigrationEvents]:
    watched = mdev.VfioMigrationEvents({h: hlab.conn(h) for h in LIBVIRT_PORTS})
    yield watched
    watched.close()


def migrate(lab: VfioLab, dest: str) -> PtmigMigration:
    """``ptmig migrate`` to *dest*; the report printed, and with a migration job that failed
    both hosts' QEMU logs too (QEMU's own reason, which libvirt shortens)."""
    moved = co.migrate(lab, dest)
    report = moved.report
    print(f"-> {dest}: {report.phases}\nways {report.ways}\ndevices {report.devices}")
    if report.error:
        print(f"error {report.error}\n{lab.qemu_logs()}")
    return moved


def pool_free(host: str, pool: str = co.MDEV_POOL) -> list[str]:
    (found,) = [p for p in co.ptmig_json(host, "pools") if p["name"] == pool]
    return list(found["free_devices"])


def held_mdevs(lab: VfioLab, host: str, flags: int = 0) -> list[tuple[str, str | None]]:
    """The domain's mdevs on *host* (UUID, alias), live or (*flags*) persistent."""
    return [(m.uuid, m.alias) for m in parse_domain(lab.domain(host).XMLDesc(flags)).mdevs]


def drop_wan(lab: VfioLab) -> None:
    """Team wan gone (record and NIC) and its pool unmarked: the state the negative
    control leaves behind, if it failed half way."""
    on = lab.where()
    teams = co.ptmig_json(on, "team-show", DOMAIN_NAME)["teams"]
    wan = next((t for t in teams if t["name"] == "wan"), None)
    if wan is not None:
        co.ptmig(on, "team-remove", DOMAIN_NAME, "wan")
        alias = wan["primary"]["alias"] if wan["primary"] else None
        if alias and f"'{alias}'" in lab.domain(on).XMLDesc(0):
            lab.detach(on, alias, config=True)
    co.define_whole_nic_pool(lab)


@pytest.fixture
def hybrid_guest(hlab: VfioLab) -> VfioLab:
    """Every host's mdevs present in L1, the guest holding one, team wan absent and team
    lan on a VF of the guest's host, bound and active."""
    lab = hlab
    present = set(lab.l1_exec(f"ls {mdev.MDEV_DEVICES}").check().split())
    for uuids in UUIDS.values():
        missing = [u for u in uuids if u not in present]
        if missing:
            lab.l1_exec(mdev.create_command(missing)).check()
    drop_wan(lab)
    on = lab.where()
    lan = next(
        (t for t in co.ptmig_json(on, "team-show", DOMAIN_NAME)["teams"] if t["name"] == "lan"),
        None,
    )
    alias = lan["primary"]["alias"] if lan and lan["primary"] else None
    co.team_set(lab, "lan", "preserve", primary_alias=alias)
    co.to_primary(lab, timeout=300)
    check_vf(lab, on)
    ((uuid, alias_now),) = held_mdevs(lab, on)
    assert alias_now == mdev.MDEV_ALIAS and uuid in UUIDS[on], (uuid, alias_now)
    return lab


def scratch_port(lab: VfioLab) -> int:
    return mdev.scratch_port(lab.exec(mdev.FIND_IN_L2, timeout=60).check())


def read_scratch(lab: VfioLab) -> int:
    return int(lab.exec(mdev.read_port_command(scratch_port(lab))).check().strip())


def write_marker(lab: VfioLab) -> int:
    """A byte the scratch register does not hold yet, written and read back; returned."""
    before = read_scratch(lab)
    marker = before
    while marker in (0, before):
        marker = 1 + secrets.randbelow(255)
    lab.exec(mdev.write_port_command(scratch_port(lab), marker)).check()
    assert read_scratch(lab) == marker
    return marker


def test_mdev_state_is_copied_there_and_back_while_only_the_vf_team_switches(
    hybrid_guest: VfioLab, events: mdev.VfioMigrationEvents
) -> None:
    lab = hybrid_guest
    start = lab.where()
    for dest in (OTHER[start], start):
        src = lab.where()
        marker = write_marker(lab)
        ((held, _),) = held_mdevs(lab, src)
        free_there = pool_free(dest)
        assert free_there and set(free_there) <= set(UUIDS[dest]), free_there
        events.clear()
        moved = migrate(lab, dest)
        report = moved.report
        assert moved.exit_code == 0 and report.outcome is Outcome.DONE, report
        assert lab.where() == dest
        # the mdev was carried by the state copy onto the destination's first free mdev
        assert list(report.devices) == [held], report.devices
        assert report.devices[held].startswith("copy-state: "), report.devices
        assert free_there[0] in report.devices[held], report.devices
        # only team lan's VF was switched and unplugged; it is plugged again there
        assert list(report.ways) == ["lan"] and report.ways["lan"].startswith("switch: "), report
        assert report.teams == {"lan": TeamMode.PRIMARY}
        check_vf(lab, dest)
        # the domain holds the destination's mdev, live and persistent; the source's is free
        assert held_mdevs(lab, dest) == [(free_there[0], mdev.MDEV_ALIAS)]
        persistent = held_mdevs(lab, dest, libvirt.VIR_DOMAIN_XML_INACTIVE)
        assert [u for u, _ in persistent] == [free_there[0]]
        assert held in pool_free(src)
        # QEMU copied the device's state: its own events, and the marker in the register
        assert "stop-copy" in events.wait_for(src, "stop-copy")
        assert "resuming" in events.wait_for(dest, "resuming")
        assert read_scratch(lab) == marker
        lab.check_health()


def test_a_whole_nic_in_a_pool_marked_state_copy_is_blocked_by_qemu_and_switched(
    hybrid_guest: VfioLab,
) -> None:
    """The negative control: e1000e has no VFIO migration driver, so QEMU blocks its
    state copy whatever the pool says; team wan switches (unplugged, the destination's
    NIC plugged after), and the mdev is still carried."""
    lab = hybrid_guest
    src = lab.where()
    dest = OTHER[src]
    co.define_whole_nic_pool(lab, state_copy=True)
    try:
        co.team_set(lab, "wan", "preserve")
        co.to_primary(lab, timeout=300)
        assert l1_driver(lab, lab.state.hosts[src].whole_pci) == "vfio-pci"
        ((held, _),) = held_mdevs(lab, src)
        moved = migrate(lab, dest)
        report = moved.report
        assert moved.exit_code == 0 and report.outcome is Outcome.DONE, report
        assert report.ways["wan"].startswith("switch: QEMU blocks it: "), report.ways
        assert lab.state.hosts[src].whole_pci in report.ways["wan"], report.ways
        assert report.ways["lan"].startswith("switch: "), report.ways
        assert report.devices[held].startswith("copy-state: "), report.devices
        assert report.teams == {"lan": TeamMode.PRIMARY, "wan": TeamMode.PRIMARY}
        # never left plugged: the source's NIC is back on its host driver, the
        # destination's own is the one in the domain
        assert l1_driver(lab, lab.state.hosts[src].whole_pci) == "e1000e"
        assert l1_driver(lab, lab.state.hosts[dest].whole_pci) == "vfio-pci"
        hostdevs = parse_domain(lab.domain(dest).XMLDesc(0)).hostdevs
        assert [h.host_pci_address for h in hostdevs] == [lab.state.hosts[dest].whole_pci]
    finally:
        drop_wan(lab)
    lab.check_health()


def test_a_destination_without_its_mdev_rolls_back_with_the_mdev_still_plugged(
    hybrid_guest: VfioLab,
) -> None:
    """The destination's mdevs removed from L1 while its pool still lists them (preflight
    reads the pools, not sysfs, so it passes): the migration job fails on the destination
    after the VF was unplugged, and the rollback leaves the guest on the source with its
    mdev, whose state never moved, and the VF plugged again."""
    lab = hybrid_guest
    src = lab.where()
    dest = OTHER[src]
    marker = write_marker(lab)
    before = held_mdevs(lab, src)
    left = lab.l1_exec(mdev.remove_command(UUIDS[dest]), timeout=60).check().split()
    assert not set(left) & set(UUIDS[dest]), left
    try:
        moved = migrate(lab, dest)
        report = moved.report
        assert moved.exit_code == 4 and report.outcome is Outcome.ROLLED_BACK, report
        assert "unplug" in [p.name for p in report.phases], "nothing was unplugged"
        assert report.teams == {"lan": TeamMode.PRIMARY}
        assert lab.where() == src
        assert held_mdevs(lab, src) == before
        check_vf(lab, src)
        assert read_scratch(lab) == marker
    finally:
        lab.l1_exec(mdev.create_command(UUIDS[dest])).check()
    lab.check_health()
