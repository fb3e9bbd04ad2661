"""Config file parsing: the example works, every mistake gets a precise message."""

from __future__ import annotations

from pathlib import Path

import pytest

from guest_agent import config
from guest_agent.teams import DeviceMatch, MacPolicy, Ownership

EXAMPLE = """
socket = "/run/ptmig/agent.sock"
max_message_bytes = 262144
allowed_rpcs = ["GuestAgent/GetState", "GuestAgent/UseStandby", "Health/Check"]

[transports.virtio_serial]
port = "/dev/virtio-ports/org.ptmig.agent.0"

[transports.vsock]
enabled = false

[[teams]]
name = "lan"
bond = "bond0"
standby = "enp1s0"
mac = "52:54:00:BB:00:01"

[[teams]]
name = "vf"
bond = "bond1"
standby = {mac = "52:54:00:aa:00:09"}
mac_policy = "none"
ownership = "agent"
primary = {pci_address = "05:00.1"}
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return str(path)


def test_example_config(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, EXAMPLE))
    assert cfg.allowed_rpcs == {"GuestAgent/GetState", "GuestAgent/UseStandby", "Health/Check"}
    assert cfg.virtio_serial.enabled and not cfg.vsock.enabled
    lan, vf = cfg.teams
    assert lan.standby == DeviceMatch(name="enp1s0") and lan.mac == "52:54:00:bb:00:01"
    assert (lan.mac_policy, lan.ownership) == (MacPolicy.PRESERVE, Ownership.ADMIN)
    assert vf.standby == DeviceMatch(mac="52:54:00:aa:00:09")
    assert vf.primary == DeviceMatch(pci_address="0000:05:00.1")
    assert (vf.mac_policy, vf.ownership) == (MacPolicy.NONE, Ownership.AGENT)


def test_defaults_when_default_file_missing(tmp_path: Path) -> None:
    cfg = config.load(str(tmp_path / "absent.toml"), missing_ok=True)
    assert cfg.socket == "/run/ptmig/agent.sock" and cfg.teams == ()
    assert cfg.virtio_serial.port == "/dev/virtio-ports/org.ptmig.agent.0"
    with pytest.raises(config.ConfigError, match="no such file"):
        config.load(str(tmp_path / "absent.toml"))


TEAM = '[[teams]]\nname = "lan"\nbond = "bond0"\nstandby = "enp1s0"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("socket = [", "not valid TOML"),
        ('sockett = "/x"', "unknown key(s) ['sockett']"),
        ('socket = "run/agent.sock"', "absolute path"),
        ("max_message_bytes = 10", "outside 1024"),
        ("max_message_bytes = true", "want an integer"),
        ('allowed_rpcs = ["GetState"]', "unknown ['GetState']"),
        ("[transports.vsock]\nport = 0", "outside 1"),
        ("[transports.serial]\n", "transports: unknown key(s) ['serial']"),
        (TEAM + 'mac_policy = "keep"', "'keep' is not one of preserve, follow, none"),
        (TEAM + 'ownership = "root"', "teams[0].ownership"),
        (TEAM + 'mac = "52:54:00:bb:00"', "teams[0].mac: malformed MAC"),
        (TEAM + 'mac_policy = "follow"\nmac = "52:54:00:bb:00:01"', "only used with mac_policy"),
        (TEAM + "primary = {}", "teams[0].primary: give at least one"),
        (TEAM + 'primary = {pci = "0000:02:00.0"}', "teams[0].primary: unknown key(s) ['pci']"),
        (TEAM + 'primary = {pci_address = "2:0.0"}', "malformed PCI"),
        (TEAM + "color = 1", "teams[0]: unknown key(s) ['color']"),
        ('[[teams]]\nname = "lan"\nbond = "bond0"', "teams[0].standby: want an interface name"),
        (
            '[[teams]]\nname = "lan"\nbond = "a-very-long-bond-name"\nstandby = "e"',
            "valid interface",
        ),
        (TEAM + TEAM, "teams share name ['lan']"),
    ],
)
def test_bad_config_is_explained(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as info:
        config.load(path)
    assert message in str(info.value) and path in str(info.value)
