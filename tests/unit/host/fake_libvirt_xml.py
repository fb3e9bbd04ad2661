"""Domain XML as the fake libvirt keeps and prints it (element trees, libvirt's quoting)."""

from __future__ import annotations

import copy
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape

from fake_specs import BRIDGE, ROOT_PORTS, TeamSpec

from host.domain.teams import TeamSet, format_teams


def devices_of(root: ET.Element) -> list[ET.Element]:
    devices = root.find("devices")
    return list(devices) if devices is not None else []


def alias_of(device: ET.Element) -> str | None:
    alias = device.find("alias")
    return alias.get("name") if alias is not None else None


def render(root: ET.Element, prefixes: dict[str, str]) -> str:
    """`root` as libvirt prints it: attributes in single quotes, namespaced metadata
    (libxml2's dump: double quotes) with its prefix declared on its root element."""
    lines: list[str] = []
    emit_xml(root, 0, lines, prefixes, frozenset(), "'")
    return "\n".join(lines) + "\n"


def emit_xml(
    el: ET.Element,
    depth: int,
    lines: list[str],
    prefixes: dict[str, str],
    in_scope: frozenset[str],
    quote: str,
) -> None:
    tag, attrs = el.tag, list(el.attrib.items())
    if tag.startswith("{"):
        namespace, _, local = tag[1:].partition("}")
        prefix = prefixes.get(namespace, "ns0")
        tag = f"{prefix}:{local}"
        quote = '"'
        if namespace not in in_scope:
            attrs.insert(0, (f"xmlns:{prefix}", namespace))
            in_scope = in_scope | {namespace}
    entities = {"'": "&apos;", '"': "&quot;"}
    attr_text = "".join(f" {k}={quote}{escape(v, entities)}{quote}" for k, v in attrs)
    pad = "  " * depth
    children = list(el)
    text = (el.text or "").strip()
    if not children and not text:
        lines.append(f"{pad}<{tag}{attr_text}/>")
    elif not children:
        lines.append(f"{pad}<{tag}{attr_text}>{escape(text)}</{tag}>")
    else:
        lines.append(f"{pad}<{tag}{attr_text}>")
        for child in children:
            emit_xml(child, depth + 1, lines, prefixes, in_scope, quote)
        lines.append(f"{pad}</{tag}>")


def pci_address_element(bus: int) -> ET.Element:
    return ET.Element(
        "address",
        {
            "type": "pci",
            "domain": "0x0000",
            "bus": f"0x{bus:02x}",
            "slot": "0x00",
            "function": "0x0",
        },
    )


def standby_xml(spec: TeamSpec, bus: int) -> ET.Element:
    return ET.fromstring(
        f"<interface type='bridge'><mac address='{spec.standby_mac}'/>"
        f"<source bridge='{BRIDGE}'/><target dev='{spec.standby_tap}'/>"
        "<model type='virtio'/><driver name='qemu'/><rom enabled='no'/>"
        f"<alias name='ua-{spec.name}-standby'/>"
        f"<address type='pci' domain='0x0000' bus='0x{bus:02x}' slot='0x00' function='0x0'/>"
        "</interface>"
    )


def domain_tree(
    name: str, uuid: str, teams: TeamSet, devices: list[ET.Element], *, domid: int | None
) -> ET.Element:
    """The lab guest's domain (lab/guest.py) in libvirt's words, live when *domid* is set."""
    live = domid is not None
    ports = "".join(
        f"<controller type='pci' index='{n}' model='pcie-root-port'><target chassis='{n}' "
        f"port='0x{0x10 + n - 1:x}'/>"
        + (f"<alias name='pci.{n}'/>" if live else "")
        + "</controller>"
        for n in range(1, ROOT_PORTS + 1)
    )
    channel_state = " state='connected'" if live else ""
    root = ET.fromstring(f"""<domain type='kvm'{f" id='{domid}'" if live else ""}>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <metadata>{format_teams(teams, namespaced=True)}</metadata>
  <memory unit='KiB'>524288</memory>
  <currentMemory unit='KiB'>524288</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <features><acpi/><apic/></features>
  <cpu mode='custom' match='exact' check='full'><model fallback='forbid'>qemu64</model></cpu>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='/srv/ptmig/{name}.qcow2'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x{ROOT_PORTS:02x}' slot='0x00' function='0x0'/>
    </disk>
    <controller type='pci' index='0' model='pcie-root'/>
    {ports}
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/ptmig/{name}-agent.sock'/>
      <target type='virtio' name='org.ptmig.agent.0'{channel_state}/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>""")
    for device in devices:
        insert_device(root, copy.deepcopy(device))
    return root


def insert_device(root: ET.Element, device: ET.Element) -> None:
    """Where libvirt lists a NIC: after the disks and controllers, before channels."""
    devices = root.find("devices")
    assert devices is not None
    children = list(devices)
    for index, child in enumerate(children):
        if child.tag in ("channel", "serial", "console", "input", "memballoon"):
            devices.insert(index, device)
            return
    devices.append(device)


def remove_device(root: ET.Element, alias: str) -> bool:
    devices = root.find("devices")
    for device in list(devices) if devices is not None else []:
        if alias_of(device) == alias:
            devices.remove(device)  # type: ignore[union-attr]
            return True
    return False


def used_buses(root: ET.Element) -> set[int]:
    used = set()
    for device in devices_of(root):
        address = device.find("address")
        if address is not None and address.get("type") == "pci":
            used.add(int(address.get("bus", "0"), 0))
    return used


def tap_of(device: ET.Element) -> str | None:
    target = device.find("target")
    return target.get("dev") if device.tag == "interface" and target is not None else None


def host_pci_of(device: ET.Element) -> str | None:
    address = device.find("source/address")
    if device.tag != "hostdev" or address is None or device.get("type") == "mdev":
        return None
    # As ptmig writes a PCI address (host.domain.addresses.normalize_pci).
    return "{:04x}:{:02x}:{:02x}.{:x}".format(
        *(int(address.get(k, "0"), 0) for k in ("domain", "bus", "slot", "function"))
    )


def mdev_of(device: ET.Element) -> str | None:
    """A mediated device's UUID (``<hostdev type='mdev'><source><address uuid=>``)."""
    address = device.find("source/address")
    if device.tag != "hostdev" or device.get("type") != "mdev" or address is None:
        return None
    return address.get("uuid", "").lower() or None


def mdevs_in(root: ET.Element) -> set[str]:
    return {uuid for d in devices_of(root) if (uuid := mdev_of(d))}


def taps_in(root: ET.Element) -> set[str]:
    return {tap for d in devices_of(root) if (tap := tap_of(d))}


def host_pcis_in(root: ET.Element) -> set[str]:
    return {pci for d in devices_of(root) if (pci := host_pci_of(d))}


def set_metadata_element(root: ET.Element, namespace: str, element: ET.Element | None) -> None:
    metadata = root.find("metadata")
    if metadata is None:
        metadata = ET.Element("metadata")
        root.insert(2, metadata)
    for child in list(metadata):
        if child.tag.startswith(f"{{{namespace}}}"):
            metadata.remove(child)
    if element is not None:
        metadata.append(copy.deepcopy(element))
