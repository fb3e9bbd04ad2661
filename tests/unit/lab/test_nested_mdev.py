"""The hybrid lab's pure parts (lab.nested.mdev): each host's own mdev UUIDs, the L1
commands that make and remove them, the guest's domain XML with the mdev, and the scratch
register's port read from L2's sysfs."""

from __future__ import annotations

import shutil
import subprocess
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from host.domain.devices import mdev_hostdev_xml
from host.domain.domain_xml import parse_domain
from lab.guest import domain_xml
from lab.image import GuestImage
from lab.nested import LIBVIRT_PORTS, mdev
from lab.nested.mdev import MttyNotFound, scratch_port

#: What L2's sysfs shows for the mdev: the device, then BAR0 as an I/O range of 8 ports.
LISTING = "device 0000:05:00.0\n0x000000000000c000 0x000000000000c007 0x0000000000040101\n"


def test_each_host_has_its_own_mdevs_with_a_spare_the_same_every_run() -> None:
    sets = {host: mdev.host_uuids(host) for host in LIBVIRT_PORTS}
    assert all(len(u) == mdev.PER_HOST == 2 for u in sets.values())
    everything = [u for uuids in sets.values() for u in uuids]
    assert len(set(everything)) == len(everything)  # disjoint: one L1 kernel holds them all
    assert all(str(uuid.UUID(u)) == u for u in everything)
    assert sets == {host: mdev.host_uuids(host) for host in LIBVIRT_PORTS}


def test_l1_commands_make_and_remove_exactly_the_mdevs_named() -> None:
    a, b = mdev.host_uuids("hosta")
    made = mdev.create_command([a, b])
    assert made == (
        f"set -e; echo {a} > {mdev.MTTY_TYPES}/mtty-2/create; "
        f"echo {b} > {mdev.MTTY_TYPES}/mtty-2/create"
    )
    assert f"{mdev.MDEV_DEVICES}/{a} " in mdev.remove_command([a, b])
    assert f"{mdev.MDEV_DEVICES}/*;" in mdev.remove_command()
    assert mdev.remove_command().endswith(f"ls {mdev.MDEV_DEVICES}")
    with pytest.raises(ValueError):
        mdev.create_command(["x; rm -rf /"])


def test_remove_command_removes_each_device_and_lists_what_is_left(tmp_path: Path) -> None:
    """Run on a stand-in directory: each named device's remove file is written, the
    others are left and listed."""
    a, b = mdev.host_uuids("hostb")
    root = tmp_path / "devices"
    for u in (a, b):
        (root / u).mkdir(parents=True)
        (root / u / "remove").write_text("")
    command = mdev.remove_command([a]).replace(mdev.MDEV_DEVICES, str(root))
    out = subprocess.run(["sh", "-c", command], capture_output=True, text=True, check=True)
    assert (root / a / "remove").read_text() == "1\n"
    assert (root / b / "remove").read_text() == ""
    assert out.stdout.split() == sorted([a, b])


def test_the_guest_holds_the_mdev_with_migration_events_and_no_viommu(tmp_path: Path) -> None:
    (u, _) = mdev.host_uuids("hosta")
    xml = domain_xml(
        GuestImage(tmp_path / "image"),
        tmp_path / "d.qcow2",
        with_primary=False,
        extra_devices=mdev_hostdev_xml(alias=mdev.MDEV_ALIAS, uuid=u),
        qemu_override=mdev.override_xml(),
    )
    info = parse_domain(xml)
    assert [(m.uuid, m.alias, m.model) for m in info.mdevs] == [(u, mdev.MDEV_ALIAS, "vfio-pci")]
    root = ET.fromstring(xml)
    assert root.find("devices/iommu") is None
    ns = {"qemu": "http://libvirt.org/schemas/domain/qemu/1.0"}
    props = root.findall("qemu:override/qemu:device/qemu:frontend/qemu:property", ns)
    assert [p.attrib for p in props] == [
        {"name": "migration-events", "type": "bool", "value": "true"},
        {"name": "x-device-dirty-page-tracking", "type": "string", "value": "off"},
        {"name": "enable-migration", "type": "string", "value": "on"},
    ]
    assert root.find("qemu:override/qemu:device", ns).get("alias") == mdev.MDEV_ALIAS  # type: ignore[union-attr]
    if shutil.which("virt-xml-validate"):
        f = tmp_path / "domain.xml"
        f.write_text(xml)
        proc = subprocess.run(["virt-xml-validate", str(f), "domain"], capture_output=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_scratch_register_is_port_7_of_bar0() -> None:
    assert scratch_port(LISTING) == 0xC007
    assert scratch_port("noise\n" + LISTING + "\n") == 0xC007


@pytest.mark.parametrize(
    "listing",
    [
        "",  # no mtty device in L2
        LISTING + LISTING,  # two
        "device 0000:05:00.0\n",  # no resource line
        "device 0000:05:00.0\n0x0 0x0 0x0\n",  # BAR0 unassigned
        "device 0000:05:00.0\n0x00000000fe000000 0x00000000fe000fff 0x0000000000040200\n",  # MMIO
        "device 0000:05:00.0\n0x000000000000c000 0x000000000000c003 0x0000000000040101\n",  # short
        "device 0000:05:00.0\nnot a resource line\n",
    ],
)
def test_anything_but_one_assigned_io_bar_is_refused(listing: str) -> None:
    with pytest.raises(MttyNotFound):
        scratch_port(listing)


def test_the_port_commands_write_and_read_one_byte_and_refuse_bad_input() -> None:
    assert "os.pwrite(f, bytes([171]), 49159)" in mdev.write_port_command(0xC007, 0xAB)
    assert "os.pread(f, 1, 49159)[0]" in mdev.read_port_command(0xC007)
    for bad in ((0xC007, 256), (0xC007, -1), (0x10000, 1)):
        with pytest.raises(ValueError):
            mdev.write_port_command(*bad)
    with pytest.raises(ValueError):
        mdev.read_port_command(-1)


def test_the_port_commands_run_against_a_file_standing_in_for_dev_port(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    port_file.write_bytes(bytes(16))
    write = mdev.write_port_command(7, 0x5A).replace("/dev/port", str(port_file))
    read = mdev.read_port_command(7).replace("/dev/port", str(port_file))
    subprocess.run(["sh", "-c", write], check=True)
    out = subprocess.run(["sh", "-c", read], check=True, capture_output=True, text=True)
    assert int(out.stdout) == 0x5A
    assert port_file.read_bytes()[7] == 0x5A and port_file.read_bytes()[6] == 0


def test_vfio_migration_events_are_read_per_host_and_device() -> None:
    events = mdev.VfioMigrationEvents({})
    for host, state in (("hosta", "pre-copy"), ("hosta", "stop-copy"), ("hostb", "resuming")):
        events._on_event(
            None,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            "VFIO_MIGRATION",
            0,
            0,
            f'{{"device-id": "{mdev.MDEV_ALIAS}", "qom-path": "/x", "device-state": "{state}"}}',
            host,
        )
    assert events.states("hosta") == ["pre-copy", "stop-copy"]
    assert events.wait_for("hostb", "resuming", timeout=0) == ["resuming"]
    assert events.states("hosta", "ua-other") == []
    with pytest.raises(AssertionError, match="no VFIO_MIGRATION running"):
        events.wait_for("hostb", "running", timeout=0)
    events.clear()
    assert events.states("hosta") == []


def test_qemu_log_gives_the_tail_of_the_domains_log_or_says_it_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lab.hosts import LabHost
    from lab.nested import inside

    seen: list[str] = []

    def path_inside(_self: LabHost, path: str) -> Path:
        seen.append(path)
        return tmp_path / "guest.log"

    monkeypatch.setattr(LabHost, "path_inside", path_inside)
    assert inside.qemu_log("hosta", 2) == f"(no {tmp_path / 'guest.log'})"
    (tmp_path / "guest.log").write_text("one\ntwo\nram_save_setup failed\n")
    assert inside.qemu_log("hostb", 2) == "two\nram_save_setup failed"
    assert seen[-1] == "/var/log/libvirt/qemu/ptmig-lab-guest.log"
