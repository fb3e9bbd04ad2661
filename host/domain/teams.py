"""Team configuration, kept as libvirt domain metadata in ptmig's namespace.

A team is the guest's active-backup bond as the host sees it: the virtio standby
NIC (known by its MAC), the pool a new primary comes from, and the primary that is
plugged now.  The record travels with the domain (libvirt migrates metadata), so
the destination knows what the source plugged without any side channel.

The Hypervisor writes it with::

    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, format_teams(teams),
                    TEAMS_PREFIX, TEAMS_NS, flags)

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
misspelt ``mac-policy`` must not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Literal, TypeVar

from host.domain.addresses import normalize_mac, normalize_pci
from host.domain.errors import DomainModelError, shown
from host.domain.names import check_alias, check_ifname, check_name, check_network_name
from host.domain.xmltree import check_attributes, split_tag, to_text

_Choice = TypeVar("_Choice", bound=str)

TEAMS_NS = "https://ptmig.dev/xmlns/teams/1"
TEAMS_PREFIX = "ptmig"

MacPolicy = Literal["preserve", "follow", "none"]
PrimaryKind = Literal["emulated", "pci", "vf-network"]

_MAC_POLICIES: dict[str, MacPolicy] = {"preserve": "preserve", "follow": "follow", "none": "none"}
_PRIMARY_KINDS: dict[str, PrimaryKind] = {
    "emulated": "emulated",
    "pci": "pci",
    "vf-network": "vf-network",
}
MAC_POLICIES: tuple[MacPolicy, ...] = tuple(_MAC_POLICIES.values())
PRIMARY_KINDS: tuple[PrimaryKind, ...] = tuple(_PRIMARY_KINDS.values())


@dataclass(frozen=True)
class PrimaryDevice:
    """The primary plugged now, with the host-side identity that makes it unique.

    emulated: `tap` (and `mac`, the slot's per-host MAC);
    pci: `pci_address` of the host device (`mac` optional: the card's burned-in MAC);
    vf-network: `network` the VF came from and `mac` libvirt programmed into it;
    `pci_address` is the VF libvirt picked, when known.
    """

    kind: PrimaryKind
    alias: str
    mac: str | None = None
    pci_address: str | None = None
    network: str | None = None
    tap: str | None = None

    def __post_init__(self) -> None:
        where = f"primary {shown(self.alias)}"
        _set(self, "kind", _choice(_PRIMARY_KINDS, self.kind, f"{where}: kind"))
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

    name: str
    standby_mac: str
    mac_policy: MacPolicy
    pool: str
    team_mac: str | None = None  # the bond's MAC when it is not the standby's
    primary: PrimaryDevice | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "team name")
        where = f"team {self.name}"
        _set(self, "standby_mac", normalize_mac(self.standby_mac, f"{where}: standby-mac"))
        _set(self, "mac_policy", _choice(_MAC_POLICIES, self.mac_policy, f"{where}: mac-policy"))
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

    teams: tuple[Team, ...] = ()

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
    """The TeamSet of an already parsed ``<teams>`` element."""
    _expect(root, "teams", "teams metadata")
    check_attributes(root, (), "teams")
    teams = []
    for index, child in enumerate(_children(root), start=1):
        _expect(child, "team", f"teams: element {index}")
        teams.append(_parse_team(child, index))
    return TeamSet(tuple(teams))


def format_teams(teams: TeamSet, *, namespaced: bool = False) -> str:
    """The ``<teams>`` element for virDomainSetMetadata.

    `namespaced` gives the form found inside a domain's ``<metadata>`` (root in
    TEAMS_NS with prefix ``ptmig``), for writing a whole domain XML; never pass
    that form to setMetadata.
    """
    if namespaced:
        root = ET.Element(f"{TEAMS_PREFIX}:teams", {f"xmlns:{TEAMS_PREFIX}": TEAMS_NS})
    else:
        root = ET.Element("teams")
    for team in teams.teams:
        attrs = {
            "name": team.name,
            "pool": team.pool,
            "mac-policy": team.mac_policy,
            "standby-mac": team.standby_mac,
        }
        if team.team_mac is not None:
            attrs["team-mac"] = team.team_mac
        element = ET.SubElement(root, "team", attrs)
        if team.primary is not None:
            p = team.primary
            primary = {"kind": p.kind, "alias": p.alias}
            for name in _PRIMARY_OPTIONAL:
                value = getattr(p, name)
                if value is not None:
                    primary[_attr(name)] = value
            ET.SubElement(element, "primary", primary)
    return to_text(root)


_PRIMARY_OPTIONAL = ("mac", "pci_address", "network", "tap")
_TEAM_ATTRIBUTES = ("name", "pool", "mac-policy", "standby-mac", "team-mac")


def _parse_team(element: ET.Element, index: int) -> Team:
    where = f"team {shown(element.get('name', index))}"
    check_attributes(element, _TEAM_ATTRIBUTES, where)
    primaries = list(_children(element))
    if len(primaries) > 1:
        raise DomainModelError(f"{where}: more than one child element")
    primary = None
    if primaries:
        _expect(primaries[0], "primary", where)
        primary = _parse_primary(primaries[0], where)
    return Team(
        name=_required(element, "name", where),
        standby_mac=_required(element, "standby-mac", where),
        mac_policy=_choice(_MAC_POLICIES, _required(element, "mac-policy", where), where),
        pool=_required(element, "pool", where),
        team_mac=element.get("team-mac"),
        primary=primary,
    )


def _parse_primary(element: ET.Element, team_where: str) -> PrimaryDevice:
    where = f"{team_where}: primary"
    check_attributes(element, ("kind", "alias", *map(_attr, _PRIMARY_OPTIONAL)), where)
    if list(_children(element)):
        raise DomainModelError(f"{where}: unexpected child element")
    return PrimaryDevice(
        kind=_choice(_PRIMARY_KINDS, _required(element, "kind", where), f"{where}: kind"),
        alias=_required(element, "alias", where),
        mac=element.get("mac"),
        pci_address=element.get("pci-address"),
        network=element.get("network"),
        tap=element.get("tap"),
    )


def _children(element: ET.Element) -> list[ET.Element]:
    return [child for child in element if isinstance(child.tag, str)]


def _expect(element: ET.Element, name: str, where: str) -> None:
    namespace, local = split_tag(element)
    if namespace not in ("", TEAMS_NS):
        raise DomainModelError(
            f"{where}: element {shown(local)} is in namespace {shown(namespace)}, not {TEAMS_NS}"
        )
    if local != name:
        raise DomainModelError(f"{where}: expected <{name}>, found {shown(local)}")


def _required(element: ET.Element, name: str, where: str) -> str:
    value = element.get(name)
    if value is None:
        raise DomainModelError(f"{where}: missing attribute {name}")
    return value


def _choice(choices: dict[str, _Choice], value: object, where: str) -> _Choice:
    if not isinstance(value, str) or value not in choices:
        raise DomainModelError(
            f"{where}: unknown value {shown(value)} (want one of {', '.join(choices)})"
        )
    return choices[value]


def _attr(field: str) -> str:
    return field.replace("_", "-")


def _set(obj: object, name: str, value: object) -> None:
    """Normalise a field of a frozen dataclass in __post_init__."""
    object.__setattr__(obj, name, value)
