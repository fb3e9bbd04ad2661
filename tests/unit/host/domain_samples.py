"""Sample XML and helpers for the Domain part's tests (imported from the test files)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from host.domain.teams import PrimaryDevice, Team, TeamSet, format_teams

STANDBY_MAC = "52:54:00:00:01:01"

TEAMS = TeamSet(
    (
        Team(
            name="lan",
            standby_mac=STANDBY_MAC,
            mac_policy="preserve",
            pool="lab",
            team_mac=STANDBY_MAC,
            primary=PrimaryDevice("pci", "hostdev0", pci_address="0000:03:00.0"),
        ),
        Team(
            name="san",
            standby_mac="52:54:00:00:02:01",
            mac_policy="none",
            pool="sriov",
            primary=PrimaryDevice(
                "vf-network", "ua-ptmig-san-4", mac="52:54:00:00:02:01", network="ptmig-pool-sriov"
            ),
        ),
    )
)

# What `virsh dumpxml` shows for a running q35 guest with two teams: a virtio
# standby and a PCI hostdev primary, and a virtio standby with a VF from a
# hostdev network (live XML shows such an interface as type='hostdev').
LIVE_DOMAIN = f"""<domain type='kvm' id='1' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>guest1</name>
  <uuid>0d2f5a43-3c5e-4c4e-9a35-1f2b2d7a9c11</uuid>
  <metadata>
    <libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">
      <libosinfo:os id="http://debian.org/debian/12"/>
    </libosinfo:libosinfo>
    {format_teams(TEAMS, namespaced=True)}
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <!-- the standby of team lan -->
    <interface type='bridge'>
      <mac address='52:54:00:00:01:01'/>
      <source bridge='ptmigbr0'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:00:02:01'/>
      <source bridge='ptmigbr1'/>
      <target dev='vnet1'/>
      <model type='virtio'/>
      <alias name='net1'/>
      <address type='pci' domain='0x0000' bus='0x02' slot='0x00' function='0x0'/>
    </interface>
    <interface type='hostdev' managed='yes'>
      <mac address='52:54:00:00:02:01'/>
      <source network='ptmig-pool-sriov'>
        <address type='pci' domain='0x0000' bus='0x05' slot='0x10' function='0x2'/>
      </source>
      <alias name='ua-ptmig-san-4'/>
      <address type='pci' domain='0x0000' bus='0x04' slot='0x00' function='0x0'/>
    </interface>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <driver name='vfio'/>
      <source>
        <address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
      </source>
      <alias name='hostdev0'/>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </hostdev>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/1-guest1/org.ptmig.agent.0'/>
      <target type='virtio' name='org.ptmig.agent.0' state='connected'/>
      <alias name='channel0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/1-guest1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      <alias name='channel1'/>
    </channel>
    <vsock model='virtio'>
      <cid auto='no' address='7'/>
      <alias name='vsock0'/>
    </vsock>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-no-user-config'/>
  </qemu:commandline>
</domain>
"""

# The same guest's persistent XML: no runtime aliases, the VF as type='network'.
INACTIVE_DOMAIN = f"""<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>guest1</name>
  <uuid>0d2f5a43-3c5e-4c4e-9a35-1f2b2d7a9c11</uuid>
  <metadata>
    {format_teams(TEAMS, namespaced=True)}
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
  </os>
  <devices>
    <interface type='bridge'>
      <mac address='52:54:00:00:01:01'/>
      <source bridge='ptmigbr0'/>
      <model type='virtio'/>
      <address type='pci' domain='0x0000' bus='0x01' slot='0x00' function='0x0'/>
    </interface>
    <interface type='bridge'>
      <mac address='52:54:00:00:02:01'/>
      <source bridge='ptmigbr1'/>
      <model type='virtio'/>
    </interface>
    <interface type='network'>
      <mac address='52:54:00:00:02:01'/>
      <source network='ptmig-pool-sriov'/>
      <alias name='ua-ptmig-san-4'/>
    </interface>
    <hostdev mode='subsystem' type='pci' managed='yes'>
      <source>
        <address domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
      </source>
    </hostdev>
    <vsock model='virtio'>
      <cid auto='yes'/>
    </vsock>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-no-user-config'/>
  </qemu:commandline>
</domain>
"""


def minimal_domain(
    devices: str = "", *, metadata: str = "", name: str = "t", domain_type: str = "kvm"
) -> str:
    """A small valid q35 domain around `devices` (and `metadata`), for validation."""
    meta = f"<metadata>{metadata}</metadata>" if metadata else ""
    return (
        f"<domain type='{domain_type}'><name>{name}</name>{meta}"
        "<memory unit='KiB'>131072</memory>"
        "<os><type arch='x86_64' machine='q35'>hvm</type></os>"
        f"<devices>{devices}</devices></domain>"
    )


def virt_xml_validate(xml: str, schema: str) -> None:
    """Validate `xml` against libvirt's `schema`; skip when the tool is missing."""
    tool = shutil.which("virt-xml-validate")
    if tool is None:
        pytest.skip("virt-xml-validate is not installed (libvirt-clients)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{schema}.xml"
        path.write_text(xml)
        result = subprocess.run(
            [tool, str(path), schema], capture_output=True, text=True, timeout=60, check=False
        )
    assert result.returncode == 0, f"{result.stderr}\n{xml}"
