"""What the in-memory world is made of: hosts, pools and their slots, guests and their teams
(the specs :class:`workflow_fakes.World` builds its fakes from)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

A = "fake://a"


B = "fake://b"


C = "fake://c"  # a third host, for evacuations (not in a World unless asked for)


HOST_UUIDS = {
    A: "a0a0a0a0-0000-4000-8000-00000000000a",
    B: "b0b0b0b0-0000-4000-8000-00000000000b",
    C: "c0c0c0c0-0000-4000-8000-00000000000c",
}


POOL = "lab"


POOL_NETWORK = "ptmig-pool-lab"


BRIDGE = "br-g"


#: Each host's emulated NICs (tap, per-host MAC), like the lab's.
POOL_SLOTS = {
    A: [
        ("ptv-a1", "52:54:00:ba:00:01"),
        ("ptv-a2", "52:54:00:ba:00:02"),
        ("ptv-a3", "52:54:00:ba:00:03"),
        ("ptv-a4", "52:54:00:ba:00:04"),
    ],
    B: [
        ("ptv-b1", "52:54:00:cb:00:01"),
        ("ptv-b2", "52:54:00:cb:00:02"),
        ("ptv-b3", "52:54:00:cb:00:03"),
        ("ptv-b4", "52:54:00:cb:00:04"),
    ],
    C: [
        ("ptv-c1", "52:54:00:dc:00:01"),
        ("ptv-c2", "52:54:00:dc:00:02"),
        ("ptv-c3", "52:54:00:dc:00:03"),
        ("ptv-c4", "52:54:00:dc:00:04"),
    ],
}


def pool_slot(uri: str, index: int) -> tuple[str, str]:
    """Host *uri*'s *index*-th pool NIC (tap, MAC): POOL_SLOTS', then made up (for a host
    or a pool larger than the lab's, as the coordinator-scale benchmark needs)."""
    fixed = POOL_SLOTS.get(uri, [])
    if index < len(fixed):
        return fixed[index]
    h = zlib.crc32(uri.encode()) & 0xFF
    mac = f"52:54:{h:02x}:{index >> 16 & 0xFF:02x}:{index >> 8 & 0xFF:02x}:{index & 0xFF:02x}"
    return f"pt{h:02x}-{index:06d}", mac


ROOT_PORTS = 10  # pcie-root-ports 1..10: bus N is port N (the disk sits on the last)


LIBVIRT_NO_DOMAIN = 42


MUTATING = frozenset(
    {
        "attach",
        "detach_and_wait",
        "migrate",
        "set_metadata",
        "define_network",
        "undefine_network",
        "UseStandby",
        "BindPrimary",
    }
)


class SimulatedCrash(BaseException):
    """The coordinator dies here (not an Exception: nothing in the workflow catches it)."""


@dataclass(frozen=True)
class TeamSpec:
    name: str
    bond: str
    mac_policy: str
    standby_mac: str
    standby_tap: str
    #: Index of the source pool's slot the team's primary uses at the start (its NIC is
    #: ``pool_slot(uri, slot)``); None: none.
    slot: int | None
    pool: str = POOL

    @property
    def team_mac(self) -> str | None:
        return self.standby_mac if self.mac_policy == "preserve" else None


@dataclass(frozen=True)
class GuestSpec:
    name: str
    uuid: str
    teams: tuple[TeamSpec, ...]


LAN = TeamSpec("lan", "bond0", "preserve", "52:54:00:aa:00:01", "ptv-standby", 0)


WAN = TeamSpec("wan", "bond1", "follow", "52:54:00:aa:00:02", "ptv-wstandby", 1)


VM1 = GuestSpec("vm1", "6f1c4f0e-2d2b-4a8e-9d0c-1b2a3c4d5e01", (LAN, WAN))


VM2 = GuestSpec(
    "vm2",
    "6f1c4f0e-2d2b-4a8e-9d0c-1b2a3c4d5e02",
    (TeamSpec("lan", "bond0", "preserve", "52:54:00:aa:01:01", "ptv2-standby", 2),),
)
