"""The guest network the tests start from (no pytest here: probes import it too)."""

from __future__ import annotations

from agent_fake_links import FakeLinks

from guest_agent.links import FailOverMac
from guest_agent.teams import DeviceMatch, MacPolicy, Ownership, TeamConfig

VIRTIO_MAC = "52:54:00:aa:00:01"
OLD_MAC = "52:54:00:bb:00:01"
NEW_MAC = "52:54:00:cc:00:02"
OLD_PCI = "0000:02:00.0"
NEW_PCI = "0000:03:00.0"


def lan_team(**overrides: object) -> TeamConfig:
    fields: dict[str, object] = {
        "name": "lan",
        "bond": "bond0",
        "standby": DeviceMatch(name="enp1s0"),
        "mac_policy": MacPolicy.PRESERVE,
        "ownership": Ownership.ADMIN,
        "mac": OLD_MAC,
    }
    fields.update(overrides)
    return TeamConfig(**fields)  # type: ignore[arg-type]


def build_scene(fake: FakeLinks, fail_over_mac: FailOverMac = FailOverMac.NONE) -> None:
    """bond0 = enp1s0 (virtio standby) + enp2s0 (e1000e, active); bond1 = enp5s0 alone."""
    standby = fake.add("enp1s0", mac=VIRTIO_MAC, pci="0000:01:00.0")
    primary = fake.add("enp2s0", mac=OLD_MAC, pci=OLD_PCI)
    fake.add_bond("bond0", mac=OLD_MAC, fail_over_mac=fail_over_mac)
    fake.team("bond0", [standby, primary], active=primary)
    other = fake.add("enp5s0", mac="52:54:00:dd:00:05", pci="0000:05:00.0")
    fake.add_bond("bond1", mac="52:54:00:dd:00:05")
    fake.team("bond1", [other], active=other)
