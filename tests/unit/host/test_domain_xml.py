"""Reading domain XML, and stripping the source's device from persistent XML."""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET

import pytest
from domain_samples import INACTIVE_DOMAIN, LIVE_DOMAIN, TEAMS, minimal_domain
from hypothesis import given, settings
from hypothesis import strategies as st

from host.domain import DomainModelError
from host.domain.domain_xml import (
    DomainInfo,
    Hostdev,
    Interface,
    parse_domain,
    strip_primary,
)
from host.domain.teams import PrimaryDevice

#: A PCI address no sample uses: strip_primary then matches by alias alone.
_NOWHERE = "ffff:ff:1f.7"


def strip_alias(domain_xml: str, alias: str) -> str:
    """*domain_xml* without the device called *alias* (strip_primary, matched by alias)."""
    return strip_primary(domain_xml, PrimaryDevice("pci", alias, pci_address=_NOWHERE))


def test_live_domain() -> None:
    info = parse_domain(LIVE_DOMAIN)
    assert (info.name, info.uuid) == ("guest1", "0d2f5a43-3c5e-4c4e-9a35-1f2b2d7a9c11")
    assert info.interfaces[0] == Interface(
        type="bridge",
        mac="52:54:00:00:01:01",
        model="virtio",
        alias="net0",
        bridge="ptmigbr0",
        network=None,
        target_dev="vnet0",
        guest_pci_address="0000:01:00.0",
        host_pci_address=None,
    )
    vf = info.device("ua-ptmig-san-4")
    assert isinstance(vf, Interface)
    assert (vf.type, vf.network, vf.host_pci_address, vf.guest_pci_address) == (
        "hostdev",
        "ptmig-pool-sriov",
        "0000:05:10.2",
        "0000:04:00.0",
    )
    assert info.hostdevs == (
        Hostdev(
            alias="hostdev0",
            host_pci_address="0000:03:00.0",
            guest_pci_address="0000:03:00.0",
            managed=True,
        ),
    )
    assert info.teams == TEAMS
    assert info.device("net1").guest_pci_address == "0000:02:00.0"  # type: ignore[union-attr]
    assert info.device("nope") is None


def test_inactive_domain() -> None:
    info = parse_domain(INACTIVE_DOMAIN)
    assert [i.alias for i in info.interfaces] == [None, None, "ua-ptmig-san-4"]
    assert info.interfaces[1].guest_pci_address is None
    assert info.interfaces[2].type == "network"
    assert info.hostdevs[0].alias is None
    assert parse_domain(INACTIVE_DOMAIN).teams == TEAMS


def test_domain_without_devices_or_metadata() -> None:
    info = parse_domain("<domain type='kvm'><name>bare</name></domain>")
    assert info == DomainInfo("bare", "", (), (), None)


def test_foreign_metadata_is_ignored() -> None:
    xml = minimal_domain(metadata="<x:teams xmlns:x='urn:other'><junk/></x:teams>", name="web1")
    info = parse_domain(xml)
    assert info.teams is None
    assert info.name == "web1"  # the domain itself was read


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<network><name>n</name></network>", "not domain"),
        ("<domain/>", "no <name>"),
        (
            minimal_domain("<hostdev mode='subsystem' type='pci'><source/></hostdev>"),
            "no <source><address>",
        ),
        (
            minimal_domain(
                "<hostdev mode='subsystem' type='pci'><source>"
                "<address domain='0x0000' bus='0x100' slot='0' function='0'/></source></hostdev>"
            ),
            "bus 0x100 is out of range",
        ),
        (
            minimal_domain(
                "<hostdev mode='subsystem' type='pci'><source>"
                "<address domain='0x0000' bus='zz' slot='0' function='0'/></source></hostdev>"
            ),
            "not a number",
        ),
        (minimal_domain("<interface type='bridge'><mac address='x'/></interface>"), "MAC"),
        (minimal_domain("<interface type='bridge'><alias name='a b'/></interface>"), "alias"),
        (
            minimal_domain(
                metadata="<p:teams xmlns:p='https://ptmig.dev/xmlns/teams/1'><x/></p:teams>"
            ),
            "expected <team>",
        ),
        ('<!DOCTYPE d [<!ENTITY e "x">]><domain><name>&e;</name></domain>', "DOCTYPE"),
    ],
)
def test_bad_domain_xml(xml: str, message: str) -> None:
    with pytest.raises(DomainModelError, match=message):
        parse_domain(xml)


# --- strip ---------------------------------------------------------------------


def test_strip_by_alias_removes_only_that_device() -> None:
    stripped = strip_alias(LIVE_DOMAIN, "ua-ptmig-san-4")
    info = parse_domain(stripped)
    assert info.device("ua-ptmig-san-4") is None
    assert [i.alias for i in info.interfaces] == ["net0", "net1"]
    assert info.hostdevs and info.teams == TEAMS
    # The rest goes through as written: prefixes, comments, other metadata.
    assert "<qemu:commandline>" in stripped and "<libosinfo:os " in stripped
    assert "<!-- the standby of team lan -->" in stripped
    assert "ua-ptmig-san-4" not in stripped.split("<devices>")[1]


def test_strip_by_alias_without_that_alias_changes_nothing() -> None:
    stripped = strip_alias(INACTIVE_DOMAIN, "hostdev0")  # runtime aliases are not persistent
    assert ET.tostring(ET.fromstring(stripped)) == ET.tostring(ET.fromstring(INACTIVE_DOMAIN))


def test_strip_by_alias_refuses_bad_input() -> None:
    with pytest.raises(DomainModelError, match="alias"):
        strip_alias(LIVE_DOMAIN, "a b")
    with pytest.raises(DomainModelError, match="DOCTYPE"):
        strip_alias('<!DOCTYPE d [<!ENTITY e "x">]><domain/>', "ua-x")
    with pytest.raises(DomainModelError, match="not domain"):
        strip_alias("<network/>", "ua-x")


def test_strip_primary_finds_a_hostdev_by_pci_address() -> None:
    primary = TEAMS.team("lan").primary
    assert primary is not None
    stripped = parse_domain(strip_primary(INACTIVE_DOMAIN, primary))
    assert stripped.hostdevs == ()
    assert len(stripped.interfaces) == 3


def test_strip_primary_matches_a_vf_by_network_and_mac_never_the_standby() -> None:
    primary = TEAMS.team("san").primary
    assert primary is not None and primary.mac == "52:54:00:00:02:01"  # == the standby's
    renamed = INACTIVE_DOMAIN.replace("ua-ptmig-san-4", "ua-other")
    stripped = parse_domain(strip_primary(renamed, primary))
    assert [(i.type, i.mac) for i in stripped.interfaces] == [
        ("bridge", "52:54:00:00:01:01"),
        ("bridge", "52:54:00:00:02:01"),
    ]


def test_strip_primary_finds_an_emulated_nic_by_tap_or_mac() -> None:
    nic = (
        "<interface type='bridge'><mac address='{mac}'/><source bridge='br0'/>{target}"
        "<model type='e1000e'/></interface>"
    )
    primary = PrimaryDevice("emulated", "ua-ptmig-lan-1", mac="52:54:00:a0:00:01", tap="t0")
    by_tap = minimal_domain(nic.format(mac="52:54:00:a0:00:99", target="<target dev='t0'/>"))
    by_mac = minimal_domain(nic.format(mac="52:54:00:A0:00:01", target=""))
    assert parse_domain(strip_primary(by_tap, primary)).interfaces == ()
    assert parse_domain(strip_primary(by_mac, primary)).interfaces == ()
    virtio_same_mac = minimal_domain(
        "<interface type='bridge'><mac address='52:54:00:a0:00:01'/><model type='virtio'/>"
        "</interface>"
    )
    assert len(parse_domain(strip_primary(virtio_same_mac, primary)).interfaces) == 1


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_a_domain_or_domain_model_error(text: str) -> None:
    with contextlib.suppress(DomainModelError):
        assert isinstance(parse_domain(text), DomainInfo)
    with contextlib.suppress(DomainModelError):
        assert isinstance(strip_alias(text, "ua-x"), str)


_ATTR_VALUES = st.one_of(
    st.sampled_from(["pci", "0x01", "0x1f", "7", "bridge", "hostdev", "52:54:00:00:00:01", "yes"]),
    st.text(max_size=12),
)


@st.composite
def _domainish(draw: st.DrawFn) -> str:
    devices = ET.Element("devices")
    for _ in range(draw(st.integers(0, 4))):
        device = ET.SubElement(
            devices, draw(st.sampled_from(["interface", "hostdev", "channel", "vsock"]))
        )
        for attr in draw(st.lists(st.sampled_from(["type", "mode", "managed"]), max_size=3)):
            device.set(attr, draw(_ATTR_VALUES))
        for child in draw(
            st.lists(st.sampled_from(["mac", "source", "address", "alias", "target", "cid"]))
        ):
            element = ET.SubElement(device, child)
            for attr in draw(
                st.lists(
                    st.sampled_from(
                        ["address", "bus", "slot", "function", "domain", "name", "type", "dev"]
                    ),
                    max_size=4,
                )
            ):
                element.set(attr, draw(_ATTR_VALUES))
            if draw(st.booleans()):
                ET.SubElement(element, "address", {"bus": draw(_ATTR_VALUES)})
    domain = ET.Element("domain")
    ET.SubElement(domain, "name").text = "g"
    domain.append(devices)
    return ET.tostring(domain, encoding="unicode")


@settings(max_examples=300, deadline=None)
@given(_domainish())
def test_any_device_soup_gives_a_domain_or_domain_model_error(xml: str) -> None:
    try:
        info = parse_domain(xml)
    except DomainModelError:
        return
    for device in (*info.interfaces, *info.hostdevs):
        if device.alias is not None:
            assert parse_domain(strip_alias(xml, device.alias)).device(device.alias) is None
