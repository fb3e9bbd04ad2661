"""The guest's kernel as its agent sees it: links, bonds, carrier, MACs (see workflow_fakes)."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fake_libvirt_xml import devices_of
from ptmig.v1 import guest_agent_pb2 as pb

from host.agent_client import AgentError


@dataclass
class GuestTeam:
    name: str
    bond: str
    mac_policy: str
    standby_mac: str
    team_mac: str | None
    ownership: int
    enslaved: list[str] = field(default_factory=list)  # burned-in MACs of non-standby members
    active: str = ""  # burned-in MAC of the active member
    bond_present: bool = True
    managed_by_guest: bool = False
    last_event: pb.TeamEvent | None = None  # what the agent did on its own, if anything


@dataclass
class Link:
    name: str
    index: int
    mac: str
    permanent_mac: str
    pci_address: str


_POLICY = {
    "preserve": pb.MAC_POLICY_PRESERVE,
    "follow": pb.MAC_POLICY_FOLLOW,
    "none": pb.MAC_POLICY_NONE,
}


_POLICY_NAME = {v: k for k, v in _POLICY.items()}


@dataclass
class FakeGuest:
    """The guest's side: NICs as links, a bond per team, and how it answers requests."""

    teams: dict[str, GuestTeam]
    mac_overrides: dict[str, str] = field(default_factory=dict)  # burned-in -> current MAC
    no_carrier: set[str] = field(default_factory=set)  # burned-in MACs without carrier
    #: alias -> "timeout" | "refuse": the guest does not release that device on unplug.
    hold: dict[str, str] = field(default_factory=dict)
    agent_up: bool = True
    serving: bool = True
    operations: dict[str, tuple[Any, bytes]] = field(default_factory=dict)

    # -- links, from the devices the domain has now --------------------------------

    def links(self, live: ET.Element) -> dict[str, Link]:
        out = {}
        for device in devices_of(live):
            if device.tag not in ("interface", "hostdev") or device.get("type") == "mdev":
                continue  # a mediated device (mtty) is a serial port: no link
            mac_el, address = device.find("mac"), device.find("address")
            if address is None or address.get("type") != "pci":
                continue
            bus = int(address.get("bus", "0"), 0)
            if mac_el is not None:
                perm = mac_el.get("address", "").lower()
            elif device.tag == "hostdev":
                # A whole PCI NIC's burned-in MAC, which libvirt's XML does not show; by
                # its guest slot, so a NIC whose state QEMU copies keeps it on the other host.
                perm = f"52:54:00:fc:00:{bus:02x}"
            else:
                continue
            out[perm] = Link(
                f"enp{bus}s0",
                10 + bus,
                self.mac_overrides.get(perm, perm),
                perm,
                f"0000:{bus:02x}:00.0",
            )
        return out

    def _sync(self, links: dict[str, Link]) -> None:
        """A link that went away left its bond; an active one made the standby active."""
        for team in self.teams.values():
            team.enslaved = [m for m in team.enslaved if m in links]
            if team.active not in links or (
                team.active != team.standby_mac and team.active not in team.enslaved
            ):
                standby_up = team.standby_mac in links and team.standby_mac not in self.no_carrier
                team.active = team.standby_mac if standby_up else ""
        for perm in list(self.mac_overrides):
            if perm not in links:
                del self.mac_overrides[perm]

    def mode(self, team: str) -> str:
        """Where the team's traffic runs: "primary", "standby" or "down"."""
        t = self.teams[team]
        if not t.active:
            return "down"
        return "standby" if t.active == t.standby_mac else "primary"

    # -- what the agent reports ----------------------------------------------------

    def _team_state(self, team: GuestTeam, links: dict[str, Link]) -> pb.TeamState:
        standby = links.get(team.standby_mac)
        members = ([standby.name] if standby and team.bond_present else []) + [
            links[m].name for m in team.enslaved if team.bond_present
        ]
        if team.mac_policy == "preserve":
            mac = team.team_mac or team.standby_mac
        elif team.active in links:
            mac = links[team.active].mac
        else:
            mac = team.standby_mac
        active = links[team.active].name if team.active in links and team.bond_present else ""
        return pb.TeamState(
            name=team.name,
            bond=team.bond,
            bond_present=team.bond_present,
            mac_policy=_POLICY[team.mac_policy],
            ownership=team.ownership,
            mac=mac if team.bond_present else "",
            fail_over_mac="active" if team.mac_policy == "follow" else "none",
            active_member=active,
            standby=standby.name if standby else "",
            members=members,
            primary=next((links[m].name for m in team.enslaved), "") if team.bond_present else "",
            managed_by_guest=team.managed_by_guest,
            last_event=team.last_event,
        )

    def state(self, live: ET.Element) -> pb.GetStateResponse:
        links = self.links(live)
        self._sync(links)
        masters = {}
        for team in self.teams.values():
            if team.bond_present:
                for member in [team.standby_mac, *team.enslaved]:
                    masters[member] = team.bond
        reply = pb.GetStateResponse()
        for link in sorted(links.values(), key=lambda ln: ln.index):
            reply.links.add(
                name=link.name,
                index=link.index,
                mac=link.mac,
                permanent_mac=link.permanent_mac,
                carrier=link.permanent_mac not in self.no_carrier,
                operstate="UP",
                admin_up=True,
                master=masters.get(link.permanent_mac, ""),
                pci_address=link.pci_address,
            )
        for number, team in enumerate(self.teams.values()):
            if team.bond_present:
                reply.links.add(
                    name=team.bond,
                    index=100 + number,
                    kind="bond",
                    mac=self._team_state(team, links).mac,
                    carrier=bool(team.active),
                    operstate="UP" if team.active else "DOWN",
                    admin_up=True,
                )
        reply.teams.extend(self._team_state(t, links) for t in self.teams.values())
        return reply

    # -- what the agent does -------------------------------------------------------

    def _team(self, name: str) -> GuestTeam:
        team = self.teams.get(name)
        if team is None:
            raise AgentError("NOT_FOUND", f"unknown team {name!r} (known: {', '.join(self.teams)})")
        if not team.bond_present:
            raise AgentError("FAILED_PRECONDITION", f"team {name}: bond {team.bond} does not exist")
        return team

    def _replay(
        self, operation_id: str, fingerprint: Any, reply_type: Any, act: Callable[[], Any]
    ) -> Any:
        if not operation_id:
            raise AgentError("INVALID_ARGUMENT", "operation_id is required")
        recorded = self.operations.get(operation_id)
        if recorded is not None:
            if recorded[0] != fingerprint:
                raise AgentError(
                    "INVALID_ARGUMENT",
                    f"operation_id {operation_id!r} was already used for a different request",
                )
            reply = reply_type.FromString(recorded[1])
            reply.replayed = True
            return reply
        reply = act()
        self.operations[operation_id] = (fingerprint, reply.SerializeToString())
        return reply

    def use_standby(self, live: ET.Element, request: pb.UseStandbyRequest) -> pb.UseStandbyResponse:
        def act() -> pb.UseStandbyResponse:
            links = self.links(live)
            self._sync(links)
            team = self._team(request.team)
            if team.standby_mac not in links:
                raise AgentError(
                    "FAILED_PRECONDITION",
                    f"team {team.name}: standby ({team.standby_mac}) not found",
                )
            if team.standby_mac in self.no_carrier:
                raise AgentError(
                    "DEADLINE_EXCEEDED",
                    f"team {team.name}: standby {links[team.standby_mac].name} has no carrier",
                )
            team.active = team.standby_mac
            released = []
            if request.release_primary:
                released = [links[m].name for m in team.enslaved]
                team.enslaved = []
            return pb.UseStandbyResponse(team=self._team_state(team, links), released=released)

        key = ("UseStandby", request.team, request.release_primary)
        return self._replay(request.operation_id, key, pb.UseStandbyResponse, act)

    def bind_primary(
        self, live: ET.Element, request: pb.BindPrimaryRequest
    ) -> pb.BindPrimaryResponse:
        def act() -> pb.BindPrimaryResponse:
            links = self.links(live)
            self._sync(links)
            team = self._team(request.team)
            if not request.pci_address and not request.mac:
                raise AgentError("INVALID_ARGUMENT", "give the new device's pci_address, mac")
            mac = request.mac.lower()
            found = [
                ln
                for ln in links.values()
                if (not request.pci_address or ln.pci_address == request.pci_address)
                and (not mac or mac in (ln.mac, ln.permanent_mac))
            ]
            burned_in = [ln for ln in found if mac and ln.permanent_mac == mac]
            found = burned_in or found
            if not found:
                raise AgentError(
                    "NOT_FOUND",
                    f"team {team.name}: no device with pci "
                    f"{request.pci_address or '-'} mac {mac or '-'} appeared in time",
                )
            if len(found) > 1:
                raise AgentError("FAILED_PRECONDITION", f"team {team.name}: ambiguous device")
            device = found[0]
            perm = device.permanent_mac
            for other in self.teams.values():
                if perm == other.standby_mac or (other is not team and perm in other.enslaved):
                    raise AgentError(
                        "FAILED_PRECONDITION", f"{device.name} is a member of team {other.name}"
                    )
            policy = _POLICY_NAME.get(request.mac_policy, team.mac_policy)
            if policy == "preserve":
                self.mac_overrides[perm] = team.team_mac or team.standby_mac
            if perm not in team.enslaved:
                team.enslaved.append(perm)
            if perm in self.no_carrier:
                raise AgentError(
                    "DEADLINE_EXCEEDED",
                    f"team {team.name}: {device.name} is a "
                    f"member of {team.bond} but has no carrier",
                )
            team.active = perm
            return pb.BindPrimaryResponse(
                team=self._team_state(team, self.links(live)), device=device.name
            )

        key = ("BindPrimary", request.team, request.pci_address, request.mac, request.mac_policy)
        return self._replay(request.operation_id, key, pb.BindPrimaryResponse, act)
