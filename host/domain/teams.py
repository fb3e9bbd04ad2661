"""Team configuration, kept as libvirt domain metadata in ptmig's namespace.

A team is the guest's active-backup bond as the host sees it: the virtio standby
NIC (known by its MAC), the pool a new primary comes from, and the primary that is
plugged now.  The record travels with the domain (libvirt migrates metadata), so
the destination knows what the source plugged without any side channel.

host/hypervisor/'s ``Domain.set_metadata(TEAMS_NS, TEAMS_PREFIX, format_teams(teams))``
writes it (virDomainSetMetadata, live and persistent).

`format_teams` returns the element without a namespace: libvirt puts it into
TEAMS_NS under the prefix ``ptmig`` itself, and refuses ("failed to create a new
XML namespace") an element that already declares that prefix.  virDomainGetMetadata
returns the element without the namespace again, while the domain XML shows it
namespaced; `teams_from_element` takes both.  Example::

    <teams>
      <team name="lan" pool="lab" mac-policy="preserve"
            standby-mac="52:54:00:00:01:01" team-mac="52:54:00:00:01:01">
        <primary kind="emulated" alias="ua-ptmig-lan-1" mac="52:54:00:aa:00:01"
                 tap="ptmig-lab-0"/>
      </team>
    </teams>

Children are unqualified (libvirt namespaces only the root element); children
in TEAMS_NS are accepted too.  Unknown elements and attributes are errors: a
misspelt ``mac-policy`` must not silently fall back to a default.  Each element and
attribute is declared once, on the field of `PrimaryDevice`, `Team` or `TeamSet`
that holds it (host/domain/xmlmodel.py reads and writes from those declarations).
"""

from __future__ import annotations

import dataclasses
import enum
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

from host.domain.addresses import normalize_mac, normalize_pci
from host.domain.errors import DomainModelError, shown
from host.domain.kinds import MacPolicy, PoolKind
from host.domain.names import check_alias, check_ifname, check_name, check_network_name
from host.domain.xmlmodel import at, build, child, read
from host.domain.xmltree import to_text

_Choice = TypeVar("_Choice", bound=enum.StrEnum)

TEAMS_NS = "https://ptmig.dev/xmlns/teams/1"
TEAMS_PREFIX = "ptmig"

#: The MAC policies' words, in the order the CLI and error messages list them.
MAC_POLICIES: tuple[str, ...] = tuple(str(p) for p in MacPolicy)


@dataclass(frozen=True)
class PrimaryDevice:
    """The primary plugged now, with the host-side identity that makes it unique.

    emulated: `tap` (and `mac`, the slot's per-host MAC);
    pci: `pci_address` of the host device (`mac` optional: the card's burned-in MAC);
    vf-network: `network` the VF came from and `mac` libvirt programmed into it;
    `pci_address` is the VF libvirt picked, when known.
    """

    XML_TAG: ClassVar[str] = "primary"
    XML_STRICT: ClassVar[tuple[str, ...]] = (".",)

    kind: PoolKind = at("@kind")
    alias: str = at("@alias")
    mac: str | None = at("@mac", default=None)
    pci_address: str | None = at("@pci-address", default=None)
    network: str | None = at("@network", default=None)
    tap: str | None = at("@tap", default=None)

    def __post_init__(self) -> None:
        where = f"primary {shown(self.alias)}"
        kinds = sorted(_PRIMARY_FIELDS)
        _set(self, "kind", _choice(PoolKind, self.kind, f"{where}: kind", listed=kinds))
        if self.kind not in _PRIMARY_FIELDS:  # an mdev: no NIC, no bond member
            raise DomainModelError(
                f"{where}: kind {self.kind} is no team's primary (want one of {', '.join(kinds)})"
            )
        check_alias(self.alias, "primary alias")
        if self.mac is not None:
            _set(self, "mac", normalize_mac(self.mac, f"{where}: mac"))
        if self.pci_address is not None:
            _set(self, "pci_address", normalize_pci(self.pci_address, f"{where}: pci-address"))
        if self.network is not None:
            check_network_name(self.network, f"{where}: network")
        if self.tap is not None:
            check_ifname(self.tap, f"{where}: tap")
        required, forbidden = _PRIMARY_FIELDS[self.kind]
        for name in required:
            if getattr(self, name) is None:
                raise DomainModelError(f"{where}: a {self.kind} primary needs {_attr(name)}")
        for name in forbidden:
            if getattr(self, name) is not None:
                raise DomainModelError(f"{where}: a {self.kind} primary has no {_attr(name)}")


# kind -> (fields it must have, fields it must not have)
_PRIMARY_FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "emulated": (("mac", "tap"), ("pci_address", "network")),
    "pci": (("pci_address",), ("network", "tap")),
    "vf-network": (("mac", "network"), ("tap",)),
}


@dataclass(frozen=True)
class Team:
    """One bond in the guest, as the coordinator needs to know it."""

    XML_TAG: ClassVar[str] = "team"
    XML_STRICT: ClassVar[tuple[str, ...]] = (".",)
    XML_LABEL: ClassVar[str] = "name"

    name: str = at("@name")
    standby_mac: str = at("@standby-mac")
    mac_policy: MacPolicy = at("@mac-policy")
    pool: str = at("@pool")
    team_mac: str | None = at("@team-mac", default=None)  # the bond's MAC, if not the standby's
    primary: PrimaryDevice | None = child("primary", PrimaryDevice)

    def __post_init__(self) -> None:
        check_name(self.name, "team name")
        where = f"team {self.name}"
        _set(self, "standby_mac", normalize_mac(self.standby_mac, f"{where}: standby-mac"))
        _set(self, "mac_policy", _choice(MacPolicy, self.mac_policy, f"{where}: mac-policy"))
        check_name(self.pool, f"{where}: pool")
        if self.team_mac is not None:
            _set(self, "team_mac", normalize_mac(self.team_mac, f"{where}: team-mac"))
        if self.primary is not None and not isinstance(self.primary, PrimaryDevice):
            raise DomainModelError(f"{where}: primary is not a PrimaryDevice")

    def with_primary(self, primary: PrimaryDevice | None) -> Team:
        """This team with `primary` plugged (None: unplugged)."""
        return dataclasses.replace(self, primary=primary)


@dataclass(frozen=True)
class TeamSet:
    """All teams of one domain: unique names, and no device claimed twice."""

    XML_TAG: ClassVar[str] = "teams"
    XML_NS: ClassVar[dict[str, str]] = {TEAMS_PREFIX: TEAMS_NS}
    XML_STRICT: ClassVar[tuple[str, ...]] = (".",)

    teams: tuple[Team, ...] = child("team", Team, many=True)

    def __post_init__(self) -> None:
        _set(self, "teams", tuple(self.teams))
        seen: dict[tuple[str, str], str] = {}
        for team in self.teams:
            if not isinstance(team, Team):
                raise DomainModelError("a TeamSet holds Team objects only")
            keys = [("team name", team.name), ("standby MAC", team.standby_mac)]
            if team.primary is not None:
                p = team.primary
                keys.append(("primary alias", p.alias))
                if p.tap is not None:
                    keys.append(("primary tap", p.tap))
                if p.pci_address is not None:
                    keys.append(("primary PCI address", p.pci_address))
            for key in keys:
                if key in seen:
                    raise DomainModelError(
                        f"duplicate {key[0]} {key[1]} (teams {seen[key]} and {team.name})"
                    )
                seen[key] = team.name

    def team(self, name: str) -> Team:
        """The team called `name`."""
        for team in self.teams:
            if team.name == name:
                return team
        raise DomainModelError(f"no team named {shown(name)}")

    def with_team(self, team: Team) -> TeamSet:
        """This set with `team` replacing the team of the same name, or added."""
        names = [t.name for t in self.teams]
        if team.name in names:
            teams = tuple(team if t.name == team.name else t for t in self.teams)
        else:
            teams = (*self.teams, team)
        return TeamSet(teams)


def teams_from_element(root: ET.Element) -> TeamSet:
    """The TeamSet of an already parsed ``<teams>`` element (either form)."""
    return read(TeamSet, root, "teams metadata")


def format_teams(teams: TeamSet, *, namespaced: bool = False) -> str:
    """The ``<teams>`` element for virDomainSetMetadata.

    `namespaced` gives the form found inside a domain's ``<metadata>`` (root in
    TEAMS_NS with prefix ``ptmig``), for writing a whole domain XML; never pass
    that form to setMetadata.
    """
    return to_text(build(teams, tag=f"{TEAMS_PREFIX}:teams" if namespaced else None))


def _choice(
    choices: type[_Choice], value: object, where: str, listed: Iterable[str] | None = None
) -> _Choice:
    """*value* as a member of the enum *choices*; *listed*: the order the error names them."""
    if not isinstance(value, str) or value not in {str(c) for c in choices}:
        raise DomainModelError(
            f"{where}: unknown value {shown(value)} "
            f"(want one of {', '.join(listed if listed is not None else map(str, choices))})"
        )
    return choices(value)


def _attr(field: str) -> str:
    return field.replace("_", "-")


def _set(obj: object, name: str, value: object) -> None:
    """Normalise a field of a frozen dataclass in __post_init__."""
    object.__setattr__(obj, name, value)
