"""The agent's configuration: /etc/ptmig/agent.toml (stdlib tomllib).

Unknown keys are errors, not warnings: a misspelt `mac_policy` silently falling
back to the default would change what a migration does to the guest's MAC.

    socket = "/run/ptmig/agent.sock"       # the gRPC server's only listening socket
    max_message_bytes = 262144             # larger requests: RESOURCE_EXHAUSTED
    default_timeout_ms = 10000             # waits for devices/carrier when a request says 0
    operation_log_size = 256               # remembered operation ids
    allowed_rpcs = ["GuestAgent/GetVersion", "GuestAgent/GetState",
                    "GuestAgent/UseStandby", "GuestAgent/BindPrimary", "Health/Check"]

    [transports.virtio_serial]
    enabled = true
    port = "/dev/virtio-ports/org.ptmig.agent.0"

    [transports.vsock]
    enabled = true
    port = 7031

    [[teams]]
    name = "lan"
    bond = "bond0"
    standby = "enp1s0"                     # a name, or a table: {mac = ..} / {pci_address = ..}
    mac_policy = "preserve"                # preserve | follow | none
    ownership = "admin"                    # admin | agent
    mac = "52:54:00:bb:00:01"              # preserve: the team's MAC (default: the bond's)
    primary = {pci_address = "0000:02:00.0"}  # agent: bound at start-up when present
    num_peer_notif = 1                     # agent: peer notifications per switch
    managed_by = "coordinator"             # coordinator | guest (the agent acts by itself)
    primary_rule = {driver = "e1000e"}     # guest: which plugged NIC is the primary, by
                                           # mac, pci_id ("8086:10d3"), driver, pci_slot
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from typing import Any, NamedTuple

from ptmig.serial_session import AGENT_CHANNEL

from guest_agent.addresses import AddressError, parse_mac, parse_pci
from guest_agent.rules import ManagedBy, PrimaryRule, parse_pci_id, parse_pci_slot
from guest_agent.teams import DeviceMatch, MacPolicy, Ownership, TeamConfig

DEFAULT_PATH = "/etc/ptmig/agent.toml"
DEFAULT_SOCKET = "/run/ptmig/agent.sock"
DEFAULT_SERIAL_PORT = f"/dev/virtio-ports/{AGENT_CHANNEL}"
DEFAULT_VSOCK_PORT = 7031
ALL_RPCS = (
    "GuestAgent/GetVersion",
    "GuestAgent/GetState",
    "GuestAgent/UseStandby",
    "GuestAgent/BindPrimary",
    "Health/Check",
)
MAX_IFNAME = 15  # IFNAMSIZ - 1


class ConfigError(ValueError):
    """The configuration is unusable; the message names the file and key."""


class SerialConfig(NamedTuple):
    enabled: bool = True
    port: str = DEFAULT_SERIAL_PORT


class VsockConfig(NamedTuple):
    enabled: bool = True
    port: int = DEFAULT_VSOCK_PORT


class AgentConfig(NamedTuple):
    socket: str = DEFAULT_SOCKET
    max_message_bytes: int = 256 * 1024
    default_timeout_ms: int = 10_000
    operation_log_size: int = 256
    allowed_rpcs: frozenset[str] = frozenset(ALL_RPCS)
    virtio_serial: SerialConfig = SerialConfig()
    vsock: VsockConfig = VsockConfig()
    teams: tuple[TeamConfig, ...] = ()


#: The device whose presence means a vsock transport can exist (the vsock core is loaded).
VSOCK_DEVICE = "/dev/vsock"


def reasons_to_run(cfg: AgentConfig, exists: Callable[[str], bool] = os.path.exists) -> list[str]:
    """Why the agent should run now; empty when it has nothing to do yet.

    A host reaches the agent only through a channel, so with every enabled transport's
    device missing and no guest-managed team there is nobody to serve: the unit stops and
    the udev rule starts it when a channel appears (packaging/60-ptmig-agent.rules).  A
    guest-managed team needs the agent whether or not a channel exists (Nova and KubeVirt
    give the guest none); its relays then wait for one.  With every transport disabled
    the admin asked for the local socket alone: it runs.
    """
    reasons = [
        f"guest-managed team {team.name}"
        for team in cfg.teams
        if team.managed_by is ManagedBy.GUEST
    ]
    if cfg.virtio_serial.enabled and exists(cfg.virtio_serial.port):
        reasons.append(f"virtio-serial port {cfg.virtio_serial.port}")
    if cfg.vsock.enabled and exists(VSOCK_DEVICE):
        reasons.append(f"vsock device {VSOCK_DEVICE}")
    if not cfg.virtio_serial.enabled and not cfg.vsock.enabled:
        reasons.append("no transport enabled: the local socket alone")
    return reasons


def load(path: str = DEFAULT_PATH, missing_ok: bool = False) -> AgentConfig:
    """Read and check the file; `missing_ok` gives the defaults (no teams) if absent."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        if missing_ok:
            return AgentConfig()
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # tomllib decodes before it parses
        raise ConfigError(f"{path}: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    return parse(data, path)


def parse(data: dict[str, Any], where: str = "config") -> AgentConfig:
    t = _Table(data, where)
    transports = t.table("transports")
    serial = transports.table("virtio_serial")
    vsock = transports.table("vsock")
    allowed = t.strings("allowed_rpcs", list(ALL_RPCS))
    unknown = sorted(set(allowed) - set(ALL_RPCS))
    if unknown:
        raise ConfigError(f"{where}: allowed_rpcs: unknown {unknown} (known: {list(ALL_RPCS)})")
    teams = tuple(_team(item) for item in t.tables("teams"))
    config = AgentConfig(
        socket=t.path("socket", DEFAULT_SOCKET),
        max_message_bytes=t.integer("max_message_bytes", 256 * 1024, 1024, 64 * 1024 * 1024),
        default_timeout_ms=t.integer("default_timeout_ms", 10_000, 1, 600_000),
        operation_log_size=t.integer("operation_log_size", 256, 1, 100_000),
        allowed_rpcs=frozenset(allowed),
        virtio_serial=SerialConfig(
            enabled=serial.boolean("enabled", True),
            port=serial.path("port", DEFAULT_SERIAL_PORT),
        ),
        vsock=VsockConfig(
            enabled=vsock.boolean("enabled", True),
            port=vsock.integer("port", DEFAULT_VSOCK_PORT, 1, 0xFFFFFFFE),
        ),
        teams=teams,
    )
    for table in (t, transports, serial, vsock):
        table.refuse_unknown()
    _refuse_duplicates(teams, where)
    return config


def _team(t: _Table) -> TeamConfig:
    policy = t.choice("mac_policy", MacPolicy, MacPolicy.PRESERVE)
    ownership = t.choice("ownership", Ownership, Ownership.ADMIN)
    mac = t.optional_str("mac")
    primary = t.get("primary")
    team = TeamConfig(
        name=t.string("name"),
        bond=t.ifname("bond"),
        standby=_match(t, "standby", t.get("standby"), required=True),
        mac_policy=policy,
        ownership=ownership,
        mac=t.convert("mac", parse_mac, mac) if mac is not None else None,
        primary=_match(t, "primary", primary, required=False) if primary is not None else None,
        num_peer_notif=t.integer("num_peer_notif", 1, 0, 255),
        managed_by=t.choice("managed_by", ManagedBy, ManagedBy.COORDINATOR),
        primary_rule=_rule(t),
    )
    if team.mac and policy is not MacPolicy.PRESERVE:
        raise ConfigError(f'{t.where}: mac is only used with mac_policy = "preserve"')
    if (team.managed_by is ManagedBy.GUEST) != (team.primary_rule is not None):
        raise ConfigError(f'{t.where}: managed_by = "guest" and primary_rule go together')
    t.refuse_unknown()
    return team


def _match(t: _Table, key: str, value: Any, required: bool) -> DeviceMatch:
    where = f"{t.where}.{key}"
    if isinstance(value, str):
        return DeviceMatch(name=_check_ifname(value, where))
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: want an interface name or a table {{mac/pci_address/name}}")
    m = _Table(value, where)
    name = m.optional_str("name")
    mac = m.optional_str("mac")
    pci = m.optional_str("pci_address")
    m.refuse_unknown()
    if name is None and mac is None and pci is None:
        raise ConfigError(f"{where}: give at least one of name, mac, pci_address")
    return DeviceMatch(
        name=_check_ifname(name, where) if name else None,
        mac=m.convert("mac", parse_mac, mac) if mac else None,
        pci_address=m.convert("pci_address", parse_pci, pci) if pci else None,
    )


def _rule(t: _Table) -> PrimaryRule | None:
    """A guest-managed team's primary_rule: what an operator knows before the NIC exists."""
    value = t.get("primary_rule")
    if value is None:
        return None
    r = _Table(value, f"{t.where}.primary_rule")
    mac, pci_id, driver, slot = (
        r.optional_str(key) for key in ("mac", "pci_id", "driver", "pci_slot")
    )
    r.refuse_unknown()
    if not (mac or pci_id or driver or slot):
        raise ConfigError(f"{r.where}: give at least one of mac, pci_id, driver, pci_slot")
    burned_in = r.convert("mac", parse_mac, mac) if mac else None
    try:
        return PrimaryRule(
            mac=burned_in,
            pci_id=parse_pci_id(pci_id) if pci_id else None,
            driver=driver,
            pci_slot=parse_pci_slot(slot) if slot else None,
        )
    except ValueError as exc:
        raise ConfigError(f"{r.where}: {exc}") from None


def _check_ifname(name: str, where: str) -> str:
    if not name or len(name) > MAX_IFNAME or "/" in name or any(c.isspace() for c in name):
        raise ConfigError(f"{where}: {name!r} is not a valid interface name")
    return name


def _refuse_duplicates(teams: tuple[TeamConfig, ...], where: str) -> None:
    for attr in ("name", "bond"):
        values = [getattr(team, attr) for team in teams]
        doubled = sorted({v for v in values if values.count(v) > 1})
        if doubled:
            raise ConfigError(f"{where}: teams share {attr} {doubled}")


class _Table:
    """A TOML table that remembers which keys were read, for refuse_unknown()."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: want a table")
        self.data: dict[str, Any] = data
        self.where = where
        self.seen: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        return self.data.get(key, default)

    def _typed(self, key: str, default: Any, kind: type | tuple[type, ...], want: str) -> Any:
        value = self.get(key, default)
        if (
            value is None
            or not isinstance(value, kind)
            or (kind is int and isinstance(value, bool))
        ):
            raise ConfigError(f"{self.where}.{key}: want {want}, got {value!r}")
        return value

    def string(self, key: str) -> str:
        value: str = self._typed(key, None, str, "a string")
        if not value:
            raise ConfigError(f"{self.where}.{key}: must not be empty")
        return value

    def optional_str(self, key: str) -> str | None:
        if self.data.get(key) is None:
            self.seen.add(key)
            return None
        return self.string(key)

    def path(self, key: str, default: str) -> str:
        value: str = self._typed(key, default, str, "an absolute path")
        if not os.path.isabs(value):
            raise ConfigError(f"{self.where}.{key}: want an absolute path, got {value!r}")
        return value

    def ifname(self, key: str) -> str:
        return _check_ifname(self.string(key), f"{self.where}.{key}")

    def boolean(self, key: str, default: bool) -> bool:
        value: bool = self._typed(key, default, bool, "true or false")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value: int = self._typed(key, default, int, "an integer")
        if not low <= value <= high:
            raise ConfigError(f"{self.where}.{key}: {value} is outside {low}..{high}")
        return value

    def strings(self, key: str, default: list[str]) -> list[str]:
        value = self._typed(key, default, list, "a list of strings")
        if not all(isinstance(item, str) for item in value):
            raise ConfigError(f"{self.where}.{key}: want a list of strings")
        return list(value)

    def choice(self, key: str, enum_type: Any, default: Any) -> Any:
        value = self._typed(key, default.value, str, "a string")
        try:
            return enum_type(value)
        except ValueError:
            options = ", ".join(item.value for item in enum_type)
            raise ConfigError(f"{self.where}.{key}: {value!r} is not one of {options}") from None

    def convert(self, key: str, parse_fn: Any, value: str) -> str:
        try:
            result: str = parse_fn(value)
        except AddressError as exc:
            raise ConfigError(f"{self.where}.{key}: {exc}") from None
        return result

    def table(self, key: str) -> _Table:
        return _Table(self.get(key, {}), f"{self.where}.{key}")

    def tables(self, key: str) -> list[_Table]:
        value = self.get(key, [])
        if not isinstance(value, list):
            raise ConfigError(f"{self.where}.{key}: want an array of tables ([[{key}]])")
        return [_Table(item, f"{self.where}.{key}[{i}]") for i, item in enumerate(value)]

    def refuse_unknown(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(f"{self.where}: unknown key(s) {unknown}")
