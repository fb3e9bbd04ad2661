"""What a guest's agent answers, as the coordinator's own types: the protobuf messages stop
at this package, so the workflow reads dataclasses and ptmig's vocabulary.

Each ``from_pb`` runs on a reply that :mod:`host.agent_client.replies` has validated; it
copies every field of the contract, so nothing the agent says is lost on the way.
"""

from __future__ import annotations

from dataclasses import dataclass

from ptmig.v1 import guest_agent_pb2 as pb

from host.domain.kinds import MacPolicy

#: The contract's MacPolicy for each of ptmig's (None: unspecified, the agent's default).
MAC_POLICY_TO_PB = {
    None: pb.MAC_POLICY_UNSPECIFIED,
    MacPolicy.PRESERVE: pb.MAC_POLICY_PRESERVE,
    MacPolicy.FOLLOW: pb.MAC_POLICY_FOLLOW,
    MacPolicy.NONE: pb.MAC_POLICY_NONE,
}
_MAC_POLICY_FROM_PB = {value: policy for policy, value in MAC_POLICY_TO_PB.items()}
#: The contract's Ownership as the agent's configuration spells it ("" unspecified).
_OWNERSHIP = {pb.OWNERSHIP_ADMIN: "admin", pb.OWNERSHIP_AGENT: "agent"}


@dataclass(frozen=True)
class LinkState:
    """One network link in the guest."""

    name: str
    index: int = 0
    mac: str = ""
    permanent_mac: str = ""
    carrier: bool = False
    operstate: str = ""
    admin_up: bool = False
    master: str = ""
    kind: str = ""
    pci_address: str = ""

    @classmethod
    def from_pb(cls, link: pb.Link) -> LinkState:
        return cls(
            link.name,
            link.index,
            link.mac,
            link.permanent_mac,
            link.carrier,
            link.operstate,
            link.admin_up,
            link.master,
            link.kind,
            link.pci_address,
        )


@dataclass(frozen=True)
class TeamEvent:
    """What the agent last did on its own for a team (a primary lost or bound)."""

    kind: str
    device: str = ""
    reason: str = ""
    ok: bool = False
    detail: str = ""
    unix_ms: int = 0


@dataclass(frozen=True)
class TeamState:
    """One team's bond as the guest has it."""

    name: str
    bond: str = ""
    bond_present: bool = False
    mac_policy: MacPolicy | None = None
    ownership: str = ""  # "admin", "agent", "" when the agent did not say
    mac: str = ""  # the bond's current MAC
    fail_over_mac: str = ""  # "none", "active", "follow"
    active_member: str = ""
    standby: str = ""
    members: tuple[str, ...] = ()
    primary: str = ""  # the first member that is not the standby
    managed_by_guest: bool = False
    last_event: TeamEvent | None = None

    @property
    def on_primary(self) -> bool:
        """The bond's traffic runs on its primary."""
        return bool(self.active_member) and self.active_member == self.primary

    @classmethod
    def from_pb(cls, team: pb.TeamState) -> TeamState:
        event = None
        if team.HasField("last_event"):
            e = team.last_event
            event = TeamEvent(e.kind, e.device, e.reason, e.ok, e.detail, e.unix_ms)
        return cls(
            name=team.name,
            bond=team.bond,
            bond_present=team.bond_present,
            mac_policy=_MAC_POLICY_FROM_PB.get(team.mac_policy),
            ownership=_OWNERSHIP.get(team.ownership, ""),
            mac=team.mac,
            fail_over_mac=team.fail_over_mac,
            active_member=team.active_member,
            standby=team.standby,
            members=tuple(team.members),
            primary=team.primary,
            managed_by_guest=team.managed_by_guest,
            last_event=event,
        )


@dataclass(frozen=True)
class GuestState:
    """The guest's links and teams, from one GetState."""

    links: tuple[LinkState, ...] = ()
    teams: tuple[TeamState, ...] = ()

    def team(self, name: str) -> TeamState | None:
        return next((t for t in self.teams if t.name == name), None)

    @classmethod
    def from_pb(cls, state: pb.GetStateResponse) -> GuestState:
        return cls(
            tuple(LinkState.from_pb(link) for link in state.links),
            tuple(TeamState.from_pb(team) for team in state.teams),
        )


@dataclass(frozen=True)
class AgentVersion:
    agent_version: str
    api_version: int
    capabilities: tuple[str, ...]


@dataclass(frozen=True)
class StandbyReply:
    """A team switched to its standby: its state after, the members it released."""

    team: TeamState
    released: tuple[str, ...] = ()
    replayed: bool = False  # the recorded outcome of an earlier call with this operation id


@dataclass(frozen=True)
class BindReply:
    """A team's new primary bound: its state after, and the guest's name for the device."""

    team: TeamState
    device: str
    replayed: bool = False
