"""The lab guest's libvirt definitions: the domain and the hot-pluggable e1000e.

q35 with ACPI PCI hotplug (QEMU's q35 default; native pciehp would add a 5 s attention
button delay to every unplug), TCG (this machine's KVM cannot run ordinary guests), direct
kernel boot, a virtio-net standby and an emulated e1000e on its own tap as the stand-in for
a passthrough NIC, a virtio-serial channel for the agent and a serial console.  Two such
pairs: team "lan" (bond0 from the guest's own network configuration) and team "wan"
(bond1, made by the agent).

The console and agent sockets sit under /var/lib/libvirt, which is private to each host,
so each host has its own; the disk sits on a path both hosts see.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

from ptmig.serial_session import AGENT_CHANNEL

from lab import PRIMARY_MAC, STANDBY_MAC, WAN_PRIMARY_MAC, WAN_STANDBY_MAC
from lab.fabric import GUEST_BRIDGE
from lab.image import BOOT_CMDLINE, GuestImage

DOMAIN_NAME = "ptmig-lab-guest"
CONSOLE_SOCKET = "/var/lib/libvirt/ptmig/console.sock"
CONSOLE_LOG = "/var/log/libvirt/ptmig-console.log"
AGENT_SOCKET = "/var/lib/libvirt/ptmig/agent.sock"
STANDBY_ALIAS = "ua-standby"
PRIMARY_ALIAS = "ua-primary"
#: Spare PCIe root ports for hot-plug (one device per port on q35).
ROOT_PORTS = 8
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"


@dataclass(frozen=True)
class Nic:
    """An emulated NIC on the guest bridge."""

    mac: str
    tap: str
    alias: str
    model: str = "e1000e"
    teaming: str | None = None  # virtio-net failover's <teaming type=...>

    def xml(self) -> str:
        driver = "<driver name='qemu'/>" if self.model == "virtio" else ""
        teaming = f"<teaming type={quoteattr(self.teaming)}/>" if self.teaming else ""
        # No option ROM: direct kernel boot needs none, and a ROM the destination lacks
        # would break migration (its RAM block must exist on both sides).
        rom = "<rom enabled='no'/>"
        return (
            "<interface type='bridge'>"
            f"<mac address={quoteattr(self.mac)}/>"
            f"<source bridge='{GUEST_BRIDGE}'/>"
            f"<target dev={quoteattr(self.tap)}/>"
            f"<model type={quoteattr(self.model)}/>{driver}{rom}{teaming}"
            f"<alias name={quoteattr(self.alias)}/>"
            "</interface>"
        )


STANDBY_NIC = Nic(STANDBY_MAC, "ptv-standby", STANDBY_ALIAS, model="virtio")
PRIMARY_NIC = Nic(PRIMARY_MAC, "ptv-primary", PRIMARY_ALIAS)
WAN_STANDBY_NIC = Nic(WAN_STANDBY_MAC, "ptv-wstandby", "ua-wan-standby", model="virtio")
WAN_PRIMARY_NIC = Nic(WAN_PRIMARY_MAC, "ptv-wprimary", "ua-wan-primary")


def domain_xml(
    image: GuestImage,
    disk: Path,
    *,
    with_primary: bool = True,
    memory_mib: int = 512,
    vcpus: int = 2,
    domain_type: str = "qemu",
    cmdline: str = BOOT_CMDLINE,
    extra_devices: str = "",
    qemu_override: str = "",
    pv_eoi: bool = True,
) -> str:
    """The guest's domain XML (`domain_type` kvm where the host can run it); `extra_devices`
    go after its NICs, a `qemu_override` (QEMU's namespace) at its end; without `pv_eoi`
    a KVM guest is offered no paravirtual EOI (``<apic eoi='off'/>``)."""
    nics = [
        n
        for n in (
            STANDBY_NIC,
            PRIMARY_NIC if with_primary else None,
            WAN_STANDBY_NIC,
            WAN_PRIMARY_NIC if with_primary else None,
        )
        if n is not None
    ]
    return _domain(
        image,
        disk,
        nics,
        memory_mib=memory_mib,
        vcpus=vcpus,
        domain_type=domain_type,
        cmdline=cmdline,
        extra_devices=extra_devices,
        qemu_override=qemu_override,
        pv_eoi=pv_eoi,
    )


#: Extra guests' memory: room for the kernel to unpack the image's initramfs (35 MiB gzip,
#: 124 MiB unpacked; 128 MiB panicked in the unpack), then systemd and the agent
#: (docs/lab.md, "Extra guests").
EXTRA_MEMORY_MIB = 256
EXTRA_VCPUS = 1
EXTRA_PREFIX = 24


@dataclass(frozen=True)
class ExtraGuest:
    """A guest booted beside the main one (``VmLab.boot_extra_guests``): the same image on
    its own overlay, with its own MACs, taps, address, console and agent channel, and one
    team (lan: bond0 from networkd on its virtio standby, an e1000e stand-in as primary).

    *index* is 2, 3, ...: the main guest is guest 1.  The guest learns its MAC and address
    from its kernel command line (lab.image's ptmig-lab-identity unit).
    """

    index: int
    memory_mib: int = EXTRA_MEMORY_MIB

    def __post_init__(self) -> None:
        if not 2 <= self.index <= 99:
            raise ValueError(f"extra guests are numbered 2..99, not {self.index}")

    @property
    def name(self) -> str:
        return f"{DOMAIN_NAME}{self.index}"

    @property
    def hostname(self) -> str:
        return f"ptmig-guest{self.index}"

    @property
    def ip(self) -> str:
        return f"192.168.77.{9 + self.index}"

    @property
    def standby(self) -> Nic:
        return Nic(
            f"52:54:00:aa:{self.index:02x}:01", f"ptv-g{self.index}s", STANDBY_ALIAS, "virtio"
        )

    @property
    def primary(self) -> Nic:
        return Nic(f"52:54:00:bb:{self.index:02x}:01", f"ptv-g{self.index}p", PRIMARY_ALIAS)

    @property
    def console_socket(self) -> str:
        return f"/var/lib/libvirt/ptmig/console-g{self.index}.sock"

    @property
    def console_log(self) -> str:
        return f"/var/log/libvirt/ptmig-console-g{self.index}.log"

    @property
    def agent_socket(self) -> str:
        return f"/var/lib/libvirt/ptmig/agent-g{self.index}.sock"

    @property
    def cmdline(self) -> str:
        return (
            f"{BOOT_CMDLINE} systemd.hostname={self.hostname} "
            f"ptmig.standby={self.standby.mac} ptmig.address={self.ip}/{EXTRA_PREFIX}"
        )


def extra_domain_xml(image: GuestImage, disk: Path, guest: ExtraGuest) -> str:
    """An extra guest's domain XML: standby and primary of team lan, 1 vCPU, less memory."""
    return _domain(
        image,
        disk,
        [guest.standby, guest.primary],
        memory_mib=guest.memory_mib,
        vcpus=EXTRA_VCPUS,
        cmdline=guest.cmdline,
        name=guest.name,
        console_socket=guest.console_socket,
        console_log=guest.console_log,
        agent_socket=guest.agent_socket,
    )


def _domain(
    image: GuestImage,
    disk: Path,
    nics: list[Nic],
    *,
    memory_mib: int,
    vcpus: int,
    domain_type: str = "qemu",
    cmdline: str = BOOT_CMDLINE,
    qemu_override: str = "",
    extra_devices: str = "",
    name: str = DOMAIN_NAME,
    console_socket: str = CONSOLE_SOCKET,
    console_log: str = CONSOLE_LOG,
    agent_socket: str = AGENT_SOCKET,
    pv_eoi: bool = True,
) -> str:
    """The domain with `nics` (and `extra_devices` after them); a `qemu_override` (QEMU's
    namespace) goes at its end."""
    ports = "\n    ".join(
        "<controller type='pci' model='pcie-root-port'/>" for _ in range(ROOT_PORTS)
    )
    nic_xml = "\n    ".join(n.xml() for n in nics)
    qemu_ns = f" xmlns:qemu='{QEMU_NS}'" if qemu_override else ""
    override = f"  {qemu_override}\n" if qemu_override else ""
    apic = "<apic/>" if pv_eoi else "<apic eoi='off'/>"
    return f"""<domain type={quoteattr(domain_type)}{qemu_ns}>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>{vcpus}</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{image.kernel}</kernel>
    <initrd>{image.initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/>{apic}</features>
  <cpu mode='custom' match='exact'><model fallback='forbid'>qemu64</model></cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='unsafe'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <controller type='usb' model='none'/>
    <controller type='pci' model='pcie-root'/>
    {ports}
    {nic_xml}{extra_devices}
    <serial type='unix'>
      <source mode='bind' path='{console_socket}'/>
      <log file='{console_log}' append='on'/>
      <target type='isa-serial' port='0'/>
    </serial>
    <channel type='unix'>
      <source mode='bind' path='{agent_socket}'/>
      <target type='virtio' name='{AGENT_CHANNEL}'/>
    </channel>
    <memballoon model='none'/>
  </devices>
{override}</domain>
"""


def failover_domain_xml(
    image: GuestImage, disk: Path, *, memory_mib: int = 512, vcpus: int = 2
) -> str:
    """The upstream comparison: QEMU virtio-net failover paired with the e1000e.

    libvirt refuses ``<teaming type='transient'>`` on an emulated NIC, so (as rehearsed in
    the lab notes) the virtio NIC carries ``<teaming type='persistent'/>`` and a QEMU
    override adds ``failover_pair_id`` to the e1000e; both NICs share one MAC, as
    net_failover requires, and the e1000e's ROM is off (the destination hides the primary,
    so its ROM's RAM block would be missing there).  The guest boots with
    ``ptmig.failover``: no bond, the failover master gets the address.
    """
    standby = Nic(STANDBY_MAC, STANDBY_NIC.tap, STANDBY_ALIAS, "virtio", teaming="persistent")
    primary = Nic(STANDBY_MAC, PRIMARY_NIC.tap, PRIMARY_ALIAS)
    override = (
        f"<qemu:override><qemu:device alias='{PRIMARY_ALIAS}'><qemu:frontend>"
        f"<qemu:property name='failover_pair_id' type='string' value='{STANDBY_ALIAS}'/>"
        "</qemu:frontend></qemu:device></qemu:override>"
    )
    return _domain(
        image,
        disk,
        [standby, primary],
        memory_mib=memory_mib,
        vcpus=vcpus,
        cmdline=f"{BOOT_CMDLINE} ptmig.failover",
        qemu_override=override,
    )
