"""host/domain/xmlmodel.py: one declaration per element/attribute reads and builds.

Each model ptmig reads or writes is built, serialised, parsed and read back equal; what
it owns (its metadata) refuses what no declaration names, what libvirt owns is read
leniently; and a declaration is the only place an attribute is named.
"""

from __future__ import annotations

import dataclasses

import pytest

from host.domain.domain_xml import Hostdev, Interface
from host.domain.errors import DomainModelError
from host.domain.pools import EmulatedPool, PciPool, TapSlot, VfNetworkPool
from host.domain.teams import PrimaryDevice, Team, TeamSet
from host.domain.xmlmodel import build, matches, read, value_at
from host.domain.xmltree import parse_xml, to_text

TEAMS = TeamSet(
    (
        Team(
            "lan",
            "52:54:00:00:00:01",
            "follow",
            "lab",
            team_mac="52:54:00:00:00:09",
            primary=PrimaryDevice("emulated", "ua-ptmig-lan-1", mac="52:54:00:aa:00:01", tap="t1"),
        ),
        Team(
            "san",
            "52:54:00:00:00:02",
            "none",
            "sriov",
            primary=PrimaryDevice(
                "vf-network",
                "ua-ptmig-san-2",
                mac="52:54:00:aa:00:02",
                network="ptmig-pool-sriov",
                pci_address="0000:05:10.1",
            ),
        ),
    )
)
MODELS = [
    TEAMS,
    Interface(
        type="bridge",
        mac="52:54:00:aa:00:01",
        bridge="br0",
        target_dev="t1",
        model="e1000e",
        rom_enabled="no",
        alias="ua-ptmig-lan-1",
    ),
    Interface(type="network", mac="52:54:00:aa:00:02", network="n", alias="ua-ptmig-san-2"),
    Hostdev(host_pci_address="0000:03:00.0", managed=True, rom_enabled="no", alias="ua-x"),
    EmulatedPool("lab", "br0", "e1000e", (TapSlot("t1", "52:54:00:a0:00:01"),)),
    PciPool("nics", ("0000:04:00.0", "0000:04:00.1")),
    VfNetworkPool("sriov", vf_addresses=("0000:05:10.0", "0000:05:10.1")),
    VfNetworkPool("pf", pf_dev="enp6s0"),
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: type(m).__name__)
def test_what_is_built_reads_back_the_same(model: object) -> None:
    text = to_text(build(model))
    assert read(type(model), parse_xml(text, "built"), "built") == model


def test_every_field_of_a_team_is_written_where_it_is_declared() -> None:
    """The attribute list exists once: the built element has exactly the declared ones."""
    element = build(TEAMS.teams[0])
    names = {f.name.replace("_", "-") for f in dataclasses.fields(Team)} - {"primary"}
    assert set(element.attrib) == names
    primary = build(TEAMS.teams[1]).find("primary")
    assert primary is not None
    assert set(primary.attrib) == {"kind", "alias", "mac", "network", "pci-address"}


def test_what_ptmig_owns_refuses_what_no_declaration_names() -> None:
    team = build(TEAMS.teams[0])
    team.set("colour", "red")
    with pytest.raises(DomainModelError, match="unknown attribute 'colour'"):
        read(Team, team, "teams")
    meta = parse_xml(to_text(build(PciPool("nics", ("0000:04:00.0",)))), "pool")
    device = meta.find("metadata/*/device")
    assert device is not None
    device.append(parse_xml("<extra/>", "x"))
    with pytest.raises(DomainModelError, match="unexpected child element 'extra'"):
        read(PciPool, meta, "pool")


def test_what_libvirt_owns_is_read_leniently() -> None:
    """libvirt adds attributes and children of its own (addresses, drivers, link state)."""
    xml = (
        "<interface type='bridge' trustGuestRxFilters='no'><mac address='52:54:00:AA:00:01'/>"
        "<source bridge='br0' portgroup='x'/><target dev='t1' managed='no'/>"
        "<model type='e1000e'/><link state='up'/><alias name='net0'/>"
        "<address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>"
        "</interface>"
    )
    nic = read(Interface, parse_xml(xml, "nic"), "domain")
    assert (nic.mac, nic.alias, nic.guest_pci_address) == (
        "52:54:00:aa:00:01",
        "net0",
        "0000:03:00.0",
    )


def test_a_hostdev_is_known_by_its_fixed_attributes() -> None:
    pci = parse_xml("<hostdev type='pci'><source><address bus='3'/></source></hostdev>", "h")
    usb = parse_xml("<hostdev mode='subsystem' type='usb'/>", "h")
    assert matches(Hostdev, pci)  # mode subsystem is libvirt's default
    assert not matches(Hostdev, usb)
    assert read(Hostdev, pci, "domain").host_pci_address == "0000:03:00.0"


def test_paths_read_namespaced_metadata() -> None:
    xml = to_text(build(EmulatedPool("lab", "br0", "e1000e", ())))
    root = parse_xml(xml, "pool")
    assert (
        value_at(root, "metadata/ptmig:pool/@bridge", {"ptmig": EmulatedPool.XML_NS["ptmig"]})
        == "br0"
    )
    assert value_at(root, "name") == "ptmig-pool-lab"
