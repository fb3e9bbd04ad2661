"""The lab's generated definitions: libvirt accepts them by its own schema, keys track inputs."""

from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from lab import GUEST_IP, STANDBY_MAC, fabric
from lab.coordinated import POOL_SLOTS, pool_slots
from lab.guest import (
    EXTRA_MEMORY_MIB,
    PRIMARY_NIC,
    ROOT_PORTS,
    STANDBY_NIC,
    WAN_PRIMARY_NIC,
    WAN_STANDBY_NIC,
    ExtraGuest,
    domain_xml,
    extra_domain_xml,
)
from lab.hosts import LabHost
from lab.image import (
    EXTRA_ADDRESS,
    EXTRA_STANDBY,
    EXTRA_TEMPLATES,
    IDENTITY_SCRIPT,
    GuestImage,
    ImageRecipe,
    _guest_files,
)

needs_validator = pytest.mark.skipif(
    shutil.which("virt-xml-validate") is None,
    reason="virt-xml-validate (libvirt-clients) not installed",
)


def _image(tmp_path: Path) -> GuestImage:
    return GuestImage(tmp_path / "image")


@needs_validator
@pytest.mark.parametrize("with_primary", [True, False])
def test_domain_xml_is_valid_by_libvirt_schema(tmp_path: Path, with_primary: bool) -> None:
    f = tmp_path / "domain.xml"
    f.write_text(domain_xml(_image(tmp_path), tmp_path / "disk.qcow2", with_primary=with_primary))
    proc = subprocess.run(["virt-xml-validate", str(f), "domain"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_domain_is_tcg_q35_with_spare_root_ports_and_both_nics(tmp_path: Path) -> None:
    root = ET.fromstring(domain_xml(_image(tmp_path), tmp_path / "disk.qcow2"))
    assert root.get("type") == "qemu"
    assert root.find("os/type").get("machine") == "q35"  # type: ignore[union-attr]
    ports = root.findall("devices/controller[@model='pcie-root-port']")
    assert len(ports) == ROOT_PORTS
    models = {
        i.find("alias").get("name"): i.find("model").get("type")  # type: ignore[union-attr]
        for i in root.findall("devices/interface")
    }
    assert models == {
        STANDBY_NIC.alias: "virtio",
        PRIMARY_NIC.alias: "e1000e",
        WAN_STANDBY_NIC.alias: "virtio",
        WAN_PRIMARY_NIC.alias: "e1000e",
    }
    without = ET.fromstring(domain_xml(_image(tmp_path), tmp_path / "d.qcow2", with_primary=False))
    assert {
        i.find("model").get("type")  # type: ignore[union-attr]
        for i in without.findall("devices/interface")
    } == {"virtio"}


def test_nic_xml_escapes_attribute_values() -> None:
    nic = PRIMARY_NIC.__class__("52:54:00:00:00:01", "tap'x", "ua-x")
    el = ET.fromstring(nic.xml())
    assert el.find("target").get("dev") == "tap'x"  # type: ignore[union-attr]


def test_image_key_changes_with_content_and_not_otherwise(tmp_path: Path) -> None:
    a = ImageRecipe(mirror="http://mirror.invalid/debian")
    assert a.image_key() == ImageRecipe(mirror="http://mirror.invalid/debian").image_key()
    changed_file = ImageRecipe(mirror=a.mirror, files={**a.files, "/etc/motd": "hi\n"})
    assert changed_file.image_key() != a.image_key()
    assert changed_file.base_key() == a.base_key(), "a config change must not redo debootstrap"
    more_packages = ImageRecipe(mirror=a.mirror, packages=(*a.packages, "socat"))
    assert more_packages.base_key() != a.base_key()
    deb = tmp_path / "agent.deb"
    deb.write_bytes(b"one")
    with_deb = ImageRecipe(mirror=a.mirror, extra_debs=(deb,))
    key = with_deb.image_key()
    deb.write_bytes(b"two")
    assert with_deb.image_key() != key, "a rebuilt package must make a new image"
    with_archive = ImageRecipe(mirror=a.mirror, archive_packages=("python3-libvirt",))
    assert with_archive.image_key() != a.image_key()
    assert with_archive.base_key() == a.base_key(), "the clean-root test's base stays stock"


def test_hosts_differ_in_uuid_address_and_state(tmp_path: Path) -> None:
    a, b = (LabHost(net) for net in fabric.HOSTS)
    assert a.host_uuid != b.host_uuid  # libvirt refuses to migrate to "the same host"
    assert a.tcp_uri != b.tcp_uri
    assert a.state_dir != b.state_dir


def test_paths_inside_a_host_map_to_its_private_dirs() -> None:
    a = LabHost(fabric.HOSTS[0])
    assert a.path_inside("/var/lib/libvirt/ptmig/console.sock") == (
        a.state_dir / "lib" / "ptmig" / "console.sock"
    )
    assert a.path_inside("/var/log/libvirt/qemu/x.log") == a.state_dir / "log" / "qemu" / "x.log"
    assert a.path_inside("/var/tmp/ptmig-lab/guest/disk.qcow2") == Path(
        "/var/tmp/ptmig-lab/guest/disk.qcow2"
    )
    assert a.path_inside("/var/lib/libvirtx") == Path("/var/lib/libvirtx")


@needs_validator
def test_extra_guest_xml_is_valid_by_libvirt_schema(tmp_path: Path) -> None:
    f = tmp_path / "domain.xml"
    f.write_text(extra_domain_xml(_image(tmp_path), tmp_path / "disk.qcow2", ExtraGuest(2)))
    proc = subprocess.run(["virt-xml-validate", str(f), "domain"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_extra_guests_have_their_own_name_nics_channel_and_address(tmp_path: Path) -> None:
    """Nothing an extra guest's domain names is the main guest's or another extra's."""
    main = ET.fromstring(domain_xml(_image(tmp_path), tmp_path / "d.qcow2"))

    def identity(root: ET.Element) -> set[str]:
        out = {root.findtext("name") or ""}
        for nic in root.findall("devices/interface"):
            out |= {nic.find("mac").get("address"), nic.find("target").get("dev")}  # type: ignore[union-attr]
        out |= {s.get("path", "") for s in root.findall("devices/*/source")} - {""}
        return out

    seen = identity(main)
    for i in (2, 3, 4):
        guest = ExtraGuest(i)
        root = ET.fromstring(extra_domain_xml(_image(tmp_path), tmp_path / f"{i}.qcow2", guest))
        mine = identity(root)
        assert not mine & seen, mine & seen
        seen |= mine
        assert root.findtext("memory") == str(EXTRA_MEMORY_MIB)
        assert f"ptmig.standby={guest.standby.mac}" in (root.findtext("os/cmdline") or "")
        assert f"ptmig.address={guest.ip}/24" in (root.findtext("os/cmdline") or "")
    assert len({ExtraGuest(i).ip for i in (2, 3, 4)} | {GUEST_IP}) == 4
    with pytest.raises(ValueError):
        ExtraGuest(1)


def test_extra_guest_files_are_the_main_guests_lan_with_its_own_mac_and_address() -> None:
    files = _guest_files()
    extra = {
        path.removeprefix(EXTRA_TEMPLATES): content
        for path, content in files.items()
        if path.startswith(EXTRA_TEMPLATES + "/")
    }
    assert set(extra) == {
        "/etc/systemd/network/10-bond0.netdev",
        "/etc/systemd/network/20-standby.network",
        "/etc/systemd/network/30-bond0.network",
        "/etc/ptmig/agent.toml",
    }
    for path, content in extra.items():
        if path.startswith("/etc/systemd/network/"):
            main = files[path].replace(STANDBY_MAC, EXTRA_STANDBY)
            assert content == main.replace(f"{GUEST_IP}/24", EXTRA_ADDRESS), path
    assert EXTRA_STANDBY in extra["/etc/ptmig/agent.toml"]
    assert files[IDENTITY_SCRIPT].startswith("#!/bin/sh")


def test_pools_are_unchanged_without_extra_guests_and_large_enough_with_them() -> None:
    assert pool_slots([]) is POOL_SLOTS
    extras = [ExtraGuest(2), ExtraGuest(3)]
    slots = pool_slots(extras)
    teams = 2 + len(extras)
    for host, host_slots in slots.items():
        assert host_slots[: len(POOL_SLOTS[host])] == POOL_SLOTS[host]
        assert len(host_slots) >= teams + 1, host
        assert len({t for t, _ in host_slots}) == len(host_slots)
    every = [mac for s in slots.values() for _, mac in s]
    assert len(set(every)) == len(every)
    assert {(g.primary.tap, g.primary.mac) for g in extras} <= set(slots["hosta"])
