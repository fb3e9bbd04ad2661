"""Who drives a team, and how a guest-managed team recognises a primary it never saw.

A team the coordinator drives (the default) changes only when the host asks.  A team
`managed_by = "guest"` is kept whole by the agent itself (`guest_agent.autonomy`): an
orchestrator (Nova, KubeVirt, virsh) unplugs and plugs its devices without asking, so
the agent must recognise the plugged NIC from what an operator can know before it
exists: its burned-in MAC, its PCI vendor:device, its driver, or the PCI slot it is
plugged into.  Pure logic over `Link`; no pyroute2 here.
"""

from __future__ import annotations

import enum
import re
from typing import NamedTuple

from guest_agent.links import Link

_PCI_ID = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{4}$")
_PCI_SLOT = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}(\.[0-7])?$")


class ManagedBy(enum.Enum):
    COORDINATOR = "coordinator"  # only the host's calls change the team (default)
    GUEST = "guest"  # the agent reacts to the team's devices coming and going


class PrimaryRule(NamedTuple):
    """Which hot-plugged NIC becomes a guest-managed team's primary; every field given
    must match.

    `mac` is the burned-in address (a whole NIC's, or the one a VF is given before the
    guest sees it); `pci_id` is "vendor:device" (8086:10d3); `driver` the bound driver
    (e1000e, iavf); `pci_slot` "dddd:bb:ss" (any function) or "dddd:bb:ss.f".
    """

    mac: str | None = None
    pci_id: str | None = None
    driver: str | None = None
    pci_slot: str | None = None

    def matches(self, link: Link) -> bool:
        slot = link.pci_address or ""
        return (
            (self.mac is None or self.mac in (link.permanent_mac, link.mac))
            and (self.pci_id is None or link.pci_id == self.pci_id)
            and (self.driver is None or link.driver == self.driver)
            and (
                self.pci_slot is None
                or slot == self.pci_slot
                or slot.rsplit(".", 1)[0] == self.pci_slot
            )
        )

    def __str__(self) -> str:
        parts = [
            f"{key} {value}"
            for key, value in (
                ("mac", self.mac),
                ("pci_id", self.pci_id),
                ("driver", self.driver),
                ("pci_slot", self.pci_slot),
            )
            if value
        ]
        return " and ".join(parts)


def parse_pci_id(text: str) -> str:
    """ "8086:10D3" -> "8086:10d3"; ValueError if it is not vendor:device in hex."""
    value = text.strip().lower()
    if not _PCI_ID.match(value):
        raise ValueError(f"malformed PCI vendor:device {text!r} (want 8086:10d3)")
    return value


def parse_pci_slot(text: str) -> str:
    """ "0000:03:00" or "0000:03:00.0", lower case; ValueError otherwise."""
    value = text.strip().lower()
    if not _PCI_SLOT.match(value):
        raise ValueError(f"malformed PCI slot {text!r} (want 0000:03:00 or 0000:03:00.0)")
    return value
