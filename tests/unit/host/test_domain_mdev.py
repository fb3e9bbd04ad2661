"""Mediated devices in the domain models: the mdev hostdev declared once (read and built),
the ``mdev`` pool kind, which of its mdevs are free, the UUID rewrite a state copy needs,
and that an mdev is never a team's primary.  libvirt's schema and test driver take the
XML ptmig builds and rewrites."""

from __future__ import annotations

import contextlib
import uuid as uuidlib
from typing import Any

import pytest
from domain_samples import LIVE_DOMAIN, minimal_domain, virt_xml_validate

from host.domain import DomainModelError
from host.domain.devices import attachment_for_slot, mdev_hostdev_xml
from host.domain.domain_xml import MdevHostdev, parse_domain, retarget_hostdev
from host.domain.kinds import PoolKind
from host.domain.pools import (
    MdevPool,
    MdevSlot,
    format_pool_network,
    free_slots,
    is_pool_device,
    make_pool,
    parse_pool_network,
)
from host.domain.teams import PrimaryDevice

U1 = "6a1c9a6e-0000-4000-8000-000000000001"
U2 = "6a1c9a6e-0000-4000-8000-000000000002"
U3 = "6a1c9a6e-0000-4000-8000-000000000003"
SERIAL = mdev_hostdev_xml(alias="ua-serial0", uuid=U1.upper())


def domain_with(*devices: str, name: str = "vm") -> str:
    return minimal_domain("".join(devices), name=name)


def test_the_mdev_hostdev_ptmig_builds_is_libvirts_and_reads_back() -> None:
    virt_xml_validate(minimal_domain(SERIAL), "domain")
    (mdev,) = parse_domain(domain_with(SERIAL)).mdevs
    assert mdev == MdevHostdev(uuid=U1, model="vfio-pci", alias="ua-serial0")
    assert parse_domain(domain_with(SERIAL)).hostdevs == ()  # no PCI hostdev


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        (
            "<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>"
            "<address uuid='not-a-uuid'/></source></hostdev>",
            "malformed UUID",
        ),
        (
            "<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source/></hostdev>",
            "no <source><address>",
        ),
    ],
)
def test_a_bad_mdev_hostdev_is_refused(xml: str, message: str) -> None:
    with pytest.raises(DomainModelError, match=message):
        parse_domain(domain_with(xml))


def test_the_mdev_pool_round_trips_and_is_strict() -> None:
    pool = MdevPool("serial", "mtty-2", (U1.upper(), U2), state_copy=True)
    assert pool.uuids == (U1, U2)
    xml = format_pool_network(pool)
    assert parse_pool_network(xml) == pool
    unknown = xml.replace("<mdev ", "<mdev parent='mtty' ", 1)
    with pytest.raises(DomainModelError, match="parent"):
        parse_pool_network(unknown)
    with pytest.raises(DomainModelError, match="listed twice"):
        MdevPool("serial", "mtty-2", (U1, U1))
    with pytest.raises(DomainModelError, match="mdev type"):
        MdevPool("serial", "mtty 2", (U1,))


def test_make_pool_takes_an_mdev_pools_fields_only() -> None:
    pool = make_pool("serial", "mdev", mdev_type="mtty-2", mdev_uuids=[U1], state_copy=True)
    assert pool == MdevPool("serial", "mtty-2", (U1,), state_copy=True)
    assert pool.kind is PoolKind.MDEV
    with pytest.raises(DomainModelError, match="needs its mdev type"):
        make_pool("serial", "mdev", mdev_uuids=[U1])
    with pytest.raises(DomainModelError, match="a mdev pool has no addresses"):
        make_pool("serial", "mdev", mdev_type="mtty-2", addresses=["0000:03:00.0"])
    with pytest.raises(DomainModelError, match="a pci pool has no mdev type, mdev uuids"):
        make_pool("nics", "pci", mdev_type="mtty-2", mdev_uuids=[U1])


def test_an_mdev_held_by_any_domain_on_the_host_is_not_free() -> None:
    pool = MdevPool("serial", "mtty-2", (U1, U2, U3))
    running = domain_with(SERIAL, name="a")
    defined = domain_with(mdev_hostdev_xml(alias="ua-x", uuid=U3), name="b")
    slots = free_slots(pool, [running, defined, LIVE_DOMAIN])
    assert slots == [MdevSlot("serial", U2, "mtty-2")]
    (mdev,) = parse_domain(running).mdevs
    assert is_pool_device(pool, mdev)
    assert not is_pool_device(MdevPool("other", "mtty-2", (U2,)), mdev)
    (pci,) = parse_domain(LIVE_DOMAIN).hostdevs
    assert not is_pool_device(pool, pci)


def test_retarget_rewrites_an_mdevs_uuid_and_keeps_the_rest() -> None:
    before = parse_domain(domain_with(SERIAL, name="vm1"))
    after = parse_domain(retarget_hostdev(domain_with(SERIAL, name="vm1"), {U1: U2}))
    (old,), (new,) = before.mdevs, after.mdevs
    assert new.uuid == U2
    assert (new.alias, new.model, new.guest_pci_address) == (
        old.alias,
        old.model,
        old.guest_pci_address,
    )
    with pytest.raises(DomainModelError, match=f"no hostdev at {U3}"):
        retarget_hostdev(domain_with(SERIAL), {U3: U2})
    # PCI and mdev moves in one pass, each by its own identity
    both = retarget_hostdev(LIVE_DOMAIN.replace("</devices>", SERIAL + "</devices>"), {U1: U2})
    assert [m.uuid for m in parse_domain(both).mdevs] == [U2]
    assert parse_domain(both).hostdevs == parse_domain(LIVE_DOMAIN).hostdevs


def test_an_mdev_is_never_a_teams_primary() -> None:
    with pytest.raises(DomainModelError, match="kind mdev is no team's primary"):
        PrimaryDevice(PoolKind.MDEV, "ua-serial0")
    with pytest.raises(DomainModelError, match="carried by a state copy"):
        attachment_for_slot(MdevSlot("serial", U1, "mtty-2"), alias="ua-ptmig-lan-1")


def test_libvirts_test_driver_keeps_the_mdev_and_takes_the_rewritten_uuid(conn: Any) -> None:
    libvirt = pytest.importorskip("libvirt")
    name = f"ptmig-{uuidlib.uuid4().hex[:8]}"
    dom = conn.defineXML(minimal_domain(SERIAL, name=name, domain_type="test"))
    try:
        inactive = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        (mdev,) = parse_domain(inactive).mdevs
        assert (mdev.uuid, mdev.alias) == (U1, "ua-serial0")
        # the persistent XML a migration sends, as libvirt would take it on the destination
        moved = retarget_hostdev(inactive, {U1: U2})
        virt_xml_validate(moved, "domain")
        dom = conn.defineXML(moved)
        (mdev,) = parse_domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)).mdevs
        assert (mdev.uuid, mdev.alias) == (U2, "ua-serial0")
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.undefine()
