"""Pools as libvirt networks, and which of their devices are free."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import pytest
from domain_samples import INACTIVE_DOMAIN, LIVE_DOMAIN, minimal_domain, virt_xml_validate
from hypothesis import given, settings
from hypothesis import strategies as st

from host.domain import DomainModelError
from host.domain.devices import emulated_nic_xml, pci_hostdev_xml, vf_interface_xml
from host.domain.pools import (
    POOL_NS,
    EmulatedPool,
    EmulatedSlot,
    PciPool,
    PciSlot,
    Pool,
    TapSlot,
    VfNetworkPool,
    VfSlot,
    format_pool_network,
    free_slots,
    parse_pool_network,
    pool_network_name,
)

LAB = EmulatedPool(
    "lab",
    bridge="ptmigbr0",
    model="e1000e",
    slots=tuple(TapSlot(f"ptmig-lab-{n}", f"52:54:00:a0:00:0{n}") for n in range(4)),
)
NICS = PciPool("nics", ("0000:04:00.0", "0000:04:00.1", "0000:05:00.0"))
SRIOV = VfNetworkPool("sriov", vf_addresses=tuple(f"0000:05:10.{f}" for f in range(4)))
POOLS: list[Pool] = [LAB, NICS, SRIOV, VfNetworkPool("pf", pf_dev="enp6s0"), PciPool("none", ())]


@pytest.mark.parametrize("pool", POOLS, ids=lambda p: p.name)
def test_round_trip_and_schema(pool: Pool) -> None:
    xml = format_pool_network(pool)
    assert parse_pool_network(xml) == pool
    virt_xml_validate(xml, "network")


def test_metadata_format() -> None:
    xml = format_pool_network(LAB)
    assert f'<ptmig:pool xmlns:ptmig="{POOL_NS}" kind="emulated" bridge="ptmigbr0"' in xml
    assert '<slot tap="ptmig-lab-0" mac="52:54:00:a0:00:00" />' in xml
    assert "<forward" not in xml  # inert
    assert pool_network_name("lab") == "ptmig-pool-lab"


def test_reads_what_libvirt_adds_and_admin_defined_vf_networks() -> None:
    live = """<network connections='1'>
      <name>ptmig-pool-sriov</name>
      <uuid>7d0d1355-bdff-4699-9d81-a5f5bd610570</uuid>
      <forward mode='hostdev' managed='yes'>
        <pf dev='enp5s0'/>
        <address type='pci' domain='0x0000' bus='0x05' slot='0x10' function='0x0'/>
        <address type='pci' domain='0x0000' bus='0x05' slot='0x10' function='0x1'/>
      </forward>
    </network>"""
    read = parse_pool_network(live)
    assert read == VfNetworkPool("sriov", "enp5s0", ("0000:05:10.0", "0000:05:10.1"))
    # The definition written back is the PF alone: libvirt keeps one or the other.
    assert parse_pool_network(format_pool_network(read)) == VfNetworkPool("sriov", "enp5s0")
    inert = format_pool_network(NICS).replace(
        "</metadata>",
        "</metadata><uuid>0883afba-9100-422a-9dc3-76f031e8d1cd</uuid>"
        "<bridge name='virbr3' stp='on' delay='0'/><mac address='52:54:00:12:34:56'/>",
    )
    assert parse_pool_network(inert) == NICS


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domain/>", "root element"),
        ("<network><name>default</name></network>", "not a ptmig pool"),
        ("<network><name>ptmig-pool-</name></network>", "not a name"),
        ("<network><name>ptmig-pool-x</name></network>", "unknown pool kind None"),
        (
            f"<network><name>ptmig-pool-x</name><metadata><p:pool xmlns:p='{POOL_NS}' "
            "kind='usb'/></metadata></network>",
            "unknown pool kind 'usb'",
        ),
        (
            "<network><name>ptmig-pool-x</name><metadata><p:pool xmlns:p='urn:other' "
            "kind='pci'/></metadata></network>",
            "unknown pool kind None",
        ),
        (
            format_pool_network(NICS).replace("<metadata>", "<forward mode='nat'/><metadata>"),
            "must be inert",
        ),
        (
            format_pool_network(SRIOV).replace("hostdev", "passthrough"),
            "needs <forward mode='hostdev'>",
        ),
        (format_pool_network(NICS).replace("04:00.1", "04:00.0"), "listed twice"),
        (format_pool_network(NICS).replace("<device ", "<dev "), "expected <device>"),
        (format_pool_network(NICS).replace("<device ", "<device bar='1' "), "unknown attribute"),
        (format_pool_network(NICS).replace('kind="pci"', 'kind="pci" x="1"'), "unknown attr"),
        (format_pool_network(LAB).replace("52:54:00:a0:00:02", "01:00:5e:00:00:01"), "multicast"),
        (format_pool_network(LAB).replace("ptmig-lab-2", "ptmig-lab-1"), "listed twice"),
        (format_pool_network(LAB).replace('model="e1000e"', ""), "NIC model"),
        (format_pool_network(LAB).replace("ptmig-lab-2", "x" * 16), "interface name"),
        (
            "<network><name>ptmig-pool-x</name><forward mode='hostdev'/></network>",
            "needs a pf dev or VF addresses",
        ),
        (
            "<network><name>ptmig-pool-x</name><forward mode='hostdev'>"
            "<address type='pci' domain='0' bus='0x05' slot='0x20' function='0'/>"
            "</forward></network>",
            "slot 0x20 is out of range",
        ),
        ('<!DOCTYPE n [<!ENTITY e "x">]><network><name>&e;</name></network>', "DOCTYPE"),
        (
            "<network><name>ptmig-pool-x</name><metadata>"
            + f"<p:pool xmlns:p='{POOL_NS}' kind='pci'>"
            + "<device address='0000:04:00.0'/>" * 5000
            + "</p:pool></metadata></network>",
            "more than 4096 entries",
        ),
    ],
)
def test_bad_pool_xml(xml: str, message: str) -> None:
    with pytest.raises(DomainModelError, match=message):
        parse_pool_network(xml)


# --- free slots ----------------------------------------------------------------


def domain_a() -> str:
    """Running: slot 0 of LAB by tap and MAC, 04:00.0 by hostdev, VF 05:10.1 (live)."""
    return minimal_domain(
        emulated_nic_xml(
            alias="ua-ptmig-lan-1", mac="52:54:00:a0:00:00", bridge="ptmigbr0", tap="ptmig-lab-0"
        )
        + pci_hostdev_xml(alias="ua-ptmig-lan-2", pci_address="0000:04:00.0")
        + "<interface type='hostdev' managed='yes'><mac address='52:54:00:00:02:01'/>"
        "<source network='ptmig-pool-sriov'><address type='pci' domain='0x0000' bus='0x05' "
        "slot='0x10' function='0x1'/></source><alias name='ua-ptmig-san-1'/></interface>",
        name="a",
    )


def domain_b() -> str:
    """Defined: slot 2 of LAB by MAC only, 05:00.0 as a VF-style interface, one VF (inactive)."""
    return minimal_domain(
        "<interface type='bridge'><mac address='52:54:00:a0:00:02'/><source bridge='x'/>"
        "<model type='e1000e'/></interface>"
        "<interface type='hostdev' managed='yes'><source><address type='pci' domain='0x0000' "
        "bus='0x05' slot='0x00' function='0x0'/></source></interface>"
        + vf_interface_xml(
            alias="ua-ptmig-san-2", network="ptmig-pool-sriov", mac="52:54:00:b0:00:01"
        ),
        name="b",
    )


def test_two_domains_using_different_slots_leave_the_right_ones_free() -> None:
    domains = [domain_a(), domain_b()]
    assert free_slots(LAB, domains) == [
        EmulatedSlot("lab", "ptmigbr0", "e1000e", "ptmig-lab-1", "52:54:00:a0:00:01"),
        EmulatedSlot("lab", "ptmigbr0", "e1000e", "ptmig-lab-3", "52:54:00:a0:00:03"),
    ]
    assert free_slots(NICS, domains) == [PciSlot("nics", "0000:04:00.1")]
    # 4 VFs - 05:10.1 (by address) - one inactive interface on the network
    assert free_slots(SRIOV, domains) == [VfSlot("sriov", "ptmig-pool-sriov")] * 2
    assert free_slots(LAB, []) == [
        EmulatedSlot("lab", "ptmigbr0", "e1000e", s.tap, s.mac) for s in LAB.slots
    ]


def test_each_domain_alone() -> None:
    assert [s.tap for s in free_slots(LAB, [domain_a()])] == [  # type: ignore[union-attr]
        "ptmig-lab-1",
        "ptmig-lab-2",
        "ptmig-lab-3",
    ]
    assert [s.tap for s in free_slots(LAB, [domain_b()])] == [  # type: ignore[union-attr]
        "ptmig-lab-0",
        "ptmig-lab-1",
        "ptmig-lab-3",
    ]
    assert len(free_slots(SRIOV, [domain_a()])) == 3
    assert len(free_slots(SRIOV, [domain_b()])) == 3


def test_sample_guest_takes_its_hostdev_and_vf() -> None:
    pool = PciPool("nics", ("0000:03:00.0", "0000:03:00.1"))
    assert free_slots(pool, [LIVE_DOMAIN]) == [PciSlot("nics", "0000:03:00.1")]
    assert free_slots(pool, [INACTIVE_DOMAIN]) == [PciSlot("nics", "0000:03:00.1")]
    sriov = VfNetworkPool("sriov", vf_addresses=("0000:05:10.1", "0000:05:10.2"))
    assert len(free_slots(sriov, [LIVE_DOMAIN])) == 1  # by VF address
    assert len(free_slots(sriov, [INACTIVE_DOMAIN])) == 1  # by network name
    assert len(free_slots(sriov, [LIVE_DOMAIN, INACTIVE_DOMAIN] * 3)) == 0  # never negative


def test_a_pf_only_network_has_unknown_capacity() -> None:
    with pytest.raises(DomainModelError, match="lists no VFs"):
        free_slots(VfNetworkPool("pf", pf_dev="enp6s0"), [])


def test_a_bad_domain_is_an_error_not_a_free_slot() -> None:
    with pytest.raises(DomainModelError):
        free_slots(
            NICS, ["<domain><name>x</name><devices><hostdev type='pci'/></devices></domain>"]
        )


# --- libvirt test driver -----------------------------------------------------------


@pytest.mark.parametrize("pool", [LAB, NICS, SRIOV, VfNetworkPool("pf", pf_dev="enp6s0")])
def test_libvirt_keeps_the_pool_network(conn: Any, pool: Pool) -> None:
    net = conn.networkDefineXML(format_pool_network(pool))
    try:
        assert parse_pool_network(net.XMLDesc()) == pool
        if isinstance(pool, VfNetworkPool):
            net.create()  # a hostdev network starts without touching the host
            assert parse_pool_network(net.XMLDesc()) == pool
            net.destroy()
    finally:
        net.undefine()


def test_free_slots_from_domains_defined_in_libvirt(conn: Any) -> None:
    libvirt = pytest.importorskip("libvirt")
    suffix = uuid.uuid4().hex[:6]
    doms = []
    try:
        for xml in (domain_a(), domain_b()):
            xml = xml.replace("type='kvm'", "type='test'").replace(
                "<name>", f"<name>ptmig-{suffix}-", 1
            )
            doms.append(conn.defineXML(xml))
        doms[0].create()
        domains = [d.XMLDesc(0 if d.isActive() else libvirt.VIR_DOMAIN_XML_INACTIVE) for d in doms]
        assert [s.tap for s in free_slots(LAB, domains)] == [  # type: ignore[union-attr]
            "ptmig-lab-1",
            "ptmig-lab-3",
        ]
        assert free_slots(NICS, domains) == [PciSlot("nics", "0000:04:00.1")]
    finally:
        for dom in doms:
            with contextlib.suppress(libvirt.libvirtError):
                dom.destroy()
            dom.undefine()


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_gives_a_pool_or_domain_model_error(text: str) -> None:
    with contextlib.suppress(DomainModelError):
        parse_pool_network(text)


_VALUES = st.one_of(
    st.sampled_from(
        [
            "pci",
            "emulated",
            "vf-network",
            "hostdev",
            "0000:04:00.0",
            "br0",
            "e1000e",
            "52:54:00:a0:00:01",
            "t0",
            "0x05",
        ]
    ),
    st.text(max_size=10),
)


@st.composite
def _networkish(draw: st.DrawFn) -> str:
    parts = ["<network><name>ptmig-pool-", draw(st.sampled_from(["x", "", "a b"])), "</name>"]
    if draw(st.booleans()):
        attrs = " ".join(
            f'{k}="{v}"'
            for k, v in draw(
                st.dictionaries(
                    st.sampled_from(["kind", "bridge", "model"]),
                    _VALUES.filter(lambda v: '"' not in v and "<" not in v and "&" not in v),
                )
            ).items()
        )
        children = "".join(
            f"<{draw(st.sampled_from(['device', 'slot']))} "
            f'address="{draw(st.sampled_from(["04:00.0", "x"]))}" '
            f'tap="t{n}" mac="52:54:00:a0:00:0{n}"/>'
            for n in range(draw(st.integers(0, 3)))
        )
        parts.append(
            f"<metadata><p:pool xmlns:p='{POOL_NS}' {attrs}>{children}</p:pool></metadata>"
        )
    if draw(st.booleans()):
        parts.append(f"<forward mode='{draw(st.sampled_from(['hostdev', 'nat']))}'>")
        parts.append(
            "<address type='pci' bus='0x05' slot='0x10' function='0'/>" * draw(st.integers(0, 2))
        )
        parts.append("</forward>")
    parts.append("</network>")
    return "".join(parts)


@settings(max_examples=300, deadline=None)
@given(_networkish())
def test_any_pool_ish_network_gives_a_pool_or_domain_model_error(xml: str) -> None:
    try:
        pool = parse_pool_network(xml)
    except DomainModelError:
        return
    assert parse_pool_network(format_pool_network(pool)) == pool
    with contextlib.suppress(DomainModelError):  # a PF-only VF pool has no known capacity
        free_slots(pool, [LIVE_DOMAIN])
