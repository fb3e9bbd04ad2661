"""Parsing of MAC and PCI addresses as they arrive from requests and config.

Both normalise to the kernel's spelling (lower case, full PCI domain) so that a
comparison with what netlink or sysfs report is a plain string comparison.
"""

from __future__ import annotations

import re

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_PCI = re.compile(r"^(?:([0-9a-f]{4}):)?([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")


class AddressError(ValueError):
    """A MAC or PCI address that cannot be used; the message says why."""


def parse_mac(text: str) -> str:
    """Return `text` as aa:bb:cc:dd:ee:ff, refusing what a NIC cannot carry.

    Multicast (bit 0 of the first octet) and all-zero addresses are refused: the
    kernel rejects them with EADDRNOTAVAIL, and it is better to say so up front.
    """
    mac = text.strip().lower().replace("-", ":")
    if not _MAC.match(mac):
        raise AddressError(f"malformed MAC address {text!r} (want aa:bb:cc:dd:ee:ff)")
    if int(mac[:2], 16) & 1:
        raise AddressError(f"MAC address {text!r} is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise AddressError("MAC address 00:00:00:00:00:00 is not usable")
    return mac


def parse_pci(text: str) -> str:
    """Return `text` as dddd:bb:ss.f; a missing domain means domain 0000."""
    match = _PCI.match(text.strip().lower())
    if not match:
        raise AddressError(f"malformed PCI address {text!r} (want 0000:02:00.0)")
    domain, bus, slot, function = match.groups()
    return f"{domain or '0000'}:{bus}:{slot}.{function}"


def is_pci_address(text: str) -> bool:
    """True for a full dddd:bb:ss.f name, as sysfs spells PCI devices."""
    return bool(_PCI.match(text)) and text.count(":") == 2
