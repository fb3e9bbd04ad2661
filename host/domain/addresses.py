"""MAC and PCI addresses as they appear in libvirt XML and ptmig metadata.

Both normalise to the spelling the guest agent and sysfs use (lower case, full
PCI domain: ``0000:01:00.0``) so that comparisons are plain string comparisons.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET

from host.domain.errors import DomainModelError, shown

_MAC = re.compile(r"[0-9a-f]{2}(?::[0-9a-f]{2}){5}")
_PCI = re.compile(r"(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NUMBER = re.compile(r"0x[0-9a-f]{1,8}|[0-9]{1,10}")

# Upper bounds of a PCI address's fields: the slot is 5 bits, the function 3.
_PCI_LIMITS = {"domain": 0xFFFF, "bus": 0xFF, "slot": 0x1F, "function": 0x7}


def normalize_mac(text: object, where: str) -> str:
    """Return `text` as aa:bb:cc:dd:ee:ff, refusing what a NIC cannot carry.

    Multicast and all-zero addresses are refused: libvirt and the kernel refuse
    them too, later and with a less helpful message.
    """
    if not isinstance(text, str) or len(text) > 17:
        raise DomainModelError(f"{where}: malformed MAC address {shown(text)}")
    mac = text.lower()
    if not _MAC.fullmatch(mac):
        raise DomainModelError(
            f"{where}: malformed MAC address {shown(text)} (want aa:bb:cc:dd:ee:ff)"
        )
    if int(mac[:2], 16) & 1:
        raise DomainModelError(f"{where}: MAC address {mac} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise DomainModelError(f"{where}: MAC address 00:00:00:00:00:00 is not usable")
    return mac


def normalize_pci(text: object, where: str) -> str:
    """Return `text` as dddd:bb:ss.f; a missing domain means domain 0000."""
    if not isinstance(text, str) or len(text) > 12:
        raise DomainModelError(f"{where}: malformed PCI address {shown(text)}")
    match = _PCI.fullmatch(text.lower())
    if not match:
        raise DomainModelError(f"{where}: malformed PCI address {shown(text)} (want 0000:01:00.0)")
    domain, bus, slot, function = match.groups()
    if int(slot, 16) > _PCI_LIMITS["slot"]:
        raise DomainModelError(f"{where}: PCI slot {slot} is out of range (max 1f)")
    return f"{domain or '0000'}:{bus}:{slot}.{function}"


def normalize_uuid(text: object, where: str) -> str:
    """Return `text` as a lower-case UUID (8-4-4-4-12 hex digits): a mediated device's name
    in sysfs (``/sys/bus/mdev/devices/<uuid>``) and in libvirt's ``<address uuid=>``."""
    if not isinstance(text, str) or len(text) > 36 or not _UUID.fullmatch(text.lower()):
        raise DomainModelError(
            f"{where}: malformed UUID {shown(text)} (want 8-4-4-4-12 hex digits)"
        )
    return text.lower()


def pci_from_element(address: ET.Element, where: str) -> str:
    """Read libvirt's ``<address type='pci' domain= bus= slot= function=/>``.

    libvirt reads these numbers with base 0 (``0x01`` or ``1``) and writes hex;
    a missing field is 0, as libvirt takes it.
    """
    kind = address.get("type", "pci")
    if kind != "pci":
        raise DomainModelError(f"{where}: address type {shown(kind)} is not 'pci'")
    values: dict[str, int] = {}
    for field, limit in _PCI_LIMITS.items():
        raw = address.get(field, "0").strip().lower()
        if not _NUMBER.fullmatch(raw):
            raise DomainModelError(f"{where}: PCI {field} {shown(raw)} is not a number")
        value = int(raw, 16) if raw.startswith("0x") else int(raw)
        if value > limit:
            raise DomainModelError(f"{where}: PCI {field} {raw} is out of range (max {limit:#x})")
        values[field] = value
    return f"{values['domain']:04x}:{values['bus']:02x}:{values['slot']:02x}.{values['function']:x}"


def pci_attributes(pci_address: str, *, with_type: bool = True) -> dict[str, str]:
    """The attributes of libvirt's ``<address type='pci'/>`` for `pci_address`.

    A hostdev's ``<source><address>`` takes no type attribute (libvirt's schema
    refuses one there); a network's ``<forward><address>`` requires it.
    """
    pci = normalize_pci(pci_address, "PCI address")
    domain, bus, rest = pci.split(":")
    slot, function = rest.split(".")
    attributes = {"type": "pci"} if with_type else {}
    return attributes | {
        "domain": f"0x{domain}",
        "bus": f"0x{bus}",
        "slot": f"0x{slot}",
        "function": f"0x{function}",
    }
