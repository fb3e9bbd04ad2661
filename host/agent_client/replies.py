"""What a guest's replies must be before the workflow relies on them."""

from __future__ import annotations

import re

from ptmig.v1 import guest_agent_pb2 as pb

from host.agent_client.errors import AgentError, printable

#: Bounds on a guest's claims, well above any real guest.
MAX_LINKS = 512
MAX_TEAMS = 64
_IFNAME = re.compile(r"^[^\s/:]{1,15}$")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")
_PCI = re.compile(r"^[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]$")


def check(ok: bool, what: str) -> None:
    if not ok:
        raise AgentError("PROTOCOL", f"invalid reply from the guest: {what}")


def valid_name(name: str, *, empty_ok: bool = True) -> bool:
    """A Linux interface name: 1-15 printable characters, no blank, '/' or ':'.  Control
    characters would reach logs and terminals (escape sequences) unescaped."""
    return (empty_ok and name == "") or (name.isprintable() and bool(_IFNAME.fullmatch(name)))


def validate_team(team: pb.TeamState, name: str | None = None) -> None:
    """A team's state as the workflow may rely on it; *name*: the team that was asked about.

    The active member and the primary must be members of the bond: the workflow takes
    ``active_member == primary`` for "on its primary", and a team that says so about a
    link outside its bond is a lie, not a state.
    """
    check(bool(team.name) and len(team.name) <= 64 and team.name.isprintable(), "team name")
    check(
        name is None or team.name == name,
        f"asked about team {printable(name or '')!r}, got {printable(team.name)!r}",
    )
    check(valid_name(team.bond, empty_ok=False), f"bond name {printable(team.bond)!r}")
    check(team.mac == "" or bool(_MAC.fullmatch(team.mac)), f"team MAC {printable(team.mac)!r}")
    for member in (team.active_member, team.standby, team.primary, *team.members):
        check(valid_name(member), f"member name {printable(member)!r}")
    check(len(team.members) <= 8, "too many members")
    for role, member in (("active member", team.active_member), ("primary", team.primary)):
        check(
            member == "" or member in team.members,
            f"team {printable(team.name)}: {role} {member!r} is not in the bond",
        )
    if team.HasField("last_event"):
        event = team.last_event
        check(
            len(event.kind) <= 32 and event.kind.isprintable(),
            f"event kind {printable(event.kind)!r}",
        )
        check(valid_name(event.device), f"event device {printable(event.device)!r}")


def validate_state(state: pb.GetStateResponse) -> None:
    check(len(state.links) <= MAX_LINKS, "too many links")
    check(len(state.teams) <= MAX_TEAMS, "too many teams")
    for link in state.links:
        check(valid_name(link.name, empty_ok=False), f"link name {printable(link.name)!r}")
        for mac in (link.mac, link.permanent_mac):
            check(mac == "" or bool(_MAC.fullmatch(mac)), f"MAC {printable(mac)!r}")
        check(
            link.pci_address == "" or bool(_PCI.fullmatch(link.pci_address)),
            f"PCI address {printable(link.pci_address)!r}",
        )
    names = [t.name for t in state.teams]
    check(len(names) == len(set(names)), "duplicate team names")
    for team in state.teams:
        validate_team(team)
