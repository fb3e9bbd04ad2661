"""Device XML for the destination: libvirt's schema and test driver accept it."""

from __future__ import annotations

import contextlib
import uuid
from typing import Any

import pytest
from domain_samples import minimal_domain, virt_xml_validate

from host.domain import DomainModelError
from host.domain.devices import (
    attachment_for_slot,
    emulated_nic_xml,
    next_primary_alias,
    pci_hostdev_xml,
    primary_alias,
    vf_hostdev_interface_xml,
    vf_interface_xml,
)
from host.domain.domain_xml import Hostdev, Interface, parse_domain
from host.domain.pools import EmulatedSlot, PciSlot, VfSlot
from host.domain.teams import PrimaryDevice

EMULATED = emulated_nic_xml(
    alias="ua-ptmig-lan-1", mac="52:54:00:A0:00:01", bridge="ptmigbr0", tap="ptmig-lab-0"
)
HOSTDEV = pci_hostdev_xml(alias="ua-ptmig-lan-2", pci_address="03:00.0")
VF = vf_interface_xml(alias="ua-ptmig-san-3", network="ptmig-pool-sriov", mac="52:54:00:a0:00:02")
#: A VF as OpenStack Nova plugs an SR-IOV port (the nested lab drives libvirt with it).
NOVA_VF = vf_hostdev_interface_xml(
    alias="ua-nova-lan-1", pci_address="0000:01:10.2", mac="52:54:00:aa:00:05"
)


@pytest.mark.parametrize("device", [EMULATED, HOSTDEV, VF, NOVA_VF])
def test_devices_validate_against_libvirts_schema(device: str) -> None:
    virt_xml_validate(minimal_domain(device), "domain")


def test_rom_can_stay_enabled() -> None:
    assert "<rom" not in pci_hostdev_xml(alias="ua-x", pci_address="03:00.0", rom=True)
    virt_xml_validate(
        minimal_domain(
            emulated_nic_xml(
                alias="ua-x",
                mac="52:54:00:a0:00:01",
                bridge="br0",
                tap="t0",
                model="virtio",
                rom=True,
            )
        ),
        "domain",
    )


def test_a_nova_style_vf_reads_back() -> None:
    """type hostdev, managed, the VF's host address with type='pci' (libvirt refuses an
    interface's source address without one)."""
    assert '<address type="pci" domain="0x0000" bus="0x01" slot="0x10"' in NOVA_VF
    info = parse_domain(minimal_domain(NOVA_VF))
    assert info.device("ua-nova-lan-1") == Interface(
        type="hostdev",
        managed=True,
        mac="52:54:00:aa:00:05",
        alias="ua-nova-lan-1",
        host_pci_address="0000:01:10.2",
    )


def test_devices_read_back() -> None:
    info = parse_domain(minimal_domain(EMULATED + HOSTDEV + VF))
    assert info.device("ua-ptmig-lan-1") == Interface(
        type="bridge",
        mac="52:54:00:a0:00:01",
        model="e1000e",
        alias="ua-ptmig-lan-1",
        bridge="ptmigbr0",
        network=None,
        target_dev="ptmig-lab-0",
        rom_enabled="no",
        guest_pci_address=None,
        host_pci_address=None,
    )
    assert info.device("ua-ptmig-lan-2") == Hostdev(
        alias="ua-ptmig-lan-2",
        host_pci_address="0000:03:00.0",
        guest_pci_address=None,
        managed=True,
        rom_enabled="no",
    )
    vf = info.device("ua-ptmig-san-3")
    assert isinstance(vf, Interface)
    assert (vf.type, vf.network, vf.mac) == ("network", "ptmig-pool-sriov", "52:54:00:a0:00:02")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: pci_hostdev_xml(alias="hostdev9", pci_address="03:00.0"), "must start with 'ua-'"),
        (lambda: pci_hostdev_xml(alias="ua-", pci_address="03:00.0"), "must start with 'ua-'"),
        (lambda: pci_hostdev_xml(alias="ua-x", pci_address="3:0.0"), "PCI address"),
        (lambda: vf_interface_xml(alias="ua-x", network="a/b", mac="52:54:00:a0:00:02"), "net"),
        (lambda: vf_interface_xml(alias="ua-x", network="n", mac="ff:ff:ff:ff:ff:ff"), "multicast"),
        (
            lambda: emulated_nic_xml(
                alias="ua-x", mac="52:54:00:a0:00:01", bridge="b", tap="t", model="e1000e'/><evil"
            ),
            "NIC model",
        ),
        (lambda: primary_alias("lan", -1), "non-negative"),
        (lambda: primary_alias("bad name", 1), "team name"),
    ],
)
def test_builders_refuse_bad_values(build: object, message: str) -> None:
    with pytest.raises(DomainModelError, match=message):
        build()  # type: ignore[operator]


def test_aliases() -> None:
    assert primary_alias("lan", 1) == "ua-ptmig-lan-1"
    assert next_primary_alias("lan", []) == "ua-ptmig-lan-1"
    in_use = ["net0", None, "ua-ptmig-lan-1", "ua-ptmig-lan-7", "ua-ptmig-lan2-9", "ua-ptmig-lan-x"]
    assert next_primary_alias("lan", in_use) == "ua-ptmig-lan-8"


def test_attachment_for_each_slot_kind() -> None:
    emulated = attachment_for_slot(
        EmulatedSlot("lab", "ptmigbr0", "e1000e", "ptmig-lab-0", "52:54:00:a0:00:01"),
        alias="ua-ptmig-lan-1",
    )
    assert emulated.device_xml == EMULATED
    assert emulated.primary == PrimaryDevice(
        "emulated", "ua-ptmig-lan-1", mac="52:54:00:a0:00:01", tap="ptmig-lab-0"
    )
    pci = attachment_for_slot(PciSlot("nics", "0000:03:00.0"), alias="ua-ptmig-lan-2")
    assert pci.device_xml == HOSTDEV
    assert pci.primary == PrimaryDevice("pci", "ua-ptmig-lan-2", pci_address="0000:03:00.0")
    vf = attachment_for_slot(
        VfSlot("sriov", "ptmig-pool-sriov"), alias="ua-ptmig-san-3", vf_mac="52:54:00:a0:00:02"
    )
    assert vf.device_xml == VF
    assert vf.primary == PrimaryDevice(
        "vf-network", "ua-ptmig-san-3", mac="52:54:00:a0:00:02", network="ptmig-pool-sriov"
    )
    with pytest.raises(DomainModelError, match="needs the MAC"):
        attachment_for_slot(VfSlot("sriov", "ptmig-pool-sriov"), alias="ua-x")


def test_libvirt_test_driver_takes_the_devices(conn: Any) -> None:
    libvirt = pytest.importorskip("libvirt")
    name = f"ptmig-{uuid.uuid4().hex[:8]}"
    # The test driver cannot hot-plug type='network' interfaces: define the VF.
    dom = conn.defineXML(minimal_domain(HOSTDEV + VF, name=name, domain_type="test"))
    try:
        dom.create()
        dom.attachDeviceFlags(EMULATED, libvirt.VIR_DOMAIN_AFFECT_LIVE)
        live = parse_domain(dom.XMLDesc(0))
        assert [i.alias for i in live.interfaces] == ["ua-ptmig-san-3", "ua-ptmig-lan-1"]
        assert live.device("ua-ptmig-lan-2") is not None
        inactive = parse_domain(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
        assert inactive.device("ua-ptmig-lan-1") is None  # attached live only
        assert inactive.device("ua-ptmig-san-3") is not None  # user aliases persist
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            dom.destroy()
        dom.undefine()
