"""One domain on one host, and the team operations every workflow is made of.

Migration, failover, rollback, recovery and the reconciler all plug, bind and unplug
primaries the same way; the code for that lives here once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from ptmig.serial_session import AGENT_CHANNEL
from ptmig.v1 import guest_agent_pb2 as pb

from host.agent_client import AgentClient, AgentEndpoint, ChannelTurn
from host.domain.devices import attachment_for_slot, next_primary_alias
from host.domain.domain_xml import DomainInfo, parse_domain
from host.domain.errors import DomainModelError
from host.domain.kinds import MacPolicy
from host.domain.pools import (
    Pool,
    VfNetworkPool,
    free_slots,
    parse_pool_network,
    pool_network_name,
)
from host.domain.teams import TEAMS_NS, TEAMS_PREFIX, PrimaryDevice, Team, TeamSet, format_teams
from host.errors import PtmigError
from host.hypervisor import Domain, Hypervisor, HypervisorError
from host.logfields import in_this_context, log_fields
from host.workflow.drift import TeamCase, TeamClassification, classify_teams
from host.workflow.model import TeamMode

log = logging.getLogger(__name__)


class WorkflowError(PtmigError, RuntimeError):
    """A workflow cannot go on; the message says why in the user's terms."""


class PreflightError(WorkflowError):
    """Refused before anything changed."""


def serial_agent(dom: Domain, timeout: float) -> AgentClient:
    """The agent over its virtio-serial channel, through libvirt (any host, no paths),
    once no other ptmig process on this host is using that channel."""
    turn = ChannelTurn(dom.uuid)
    endpoint = AgentEndpoint(serial=lambda: dom.open_channel(AGENT_CHANNEL))
    try:
        return AgentClient(endpoint, call_timeout=timeout, turn=turn)
    except BaseException:
        turn.release()
        raise


#: How a workflow reaches a guest's agent; tests put a fake here.
AgentFactory = Callable[[Domain, float], AgentClient]


@dataclass
class GuestOnHost:
    """A domain as seen through one host's libvirt, with a lazily opened agent channel.

    The teams' pools on this host are read once until `forget_pools` (a workflow calls it
    at each step): teams bound in parallel share one read, and the claim on a device is
    the attach anyway.
    """

    hv: Hypervisor
    ident: str
    agent_for: AgentFactory = serial_agent
    agent_timeout: float = 15.0
    _pools: dict[str, Pool | None] = field(default_factory=dict, repr=False)
    _pools_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _agent: AgentClient | None = field(default=None, repr=False)
    #: Teams are worked on in parallel; the metadata is one document, read-modify-written.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: One plug at a time per domain: free slots are computed from the domain's own XML.
    _plug_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self.dom = self.hv.domain(self.ident)

    @property
    def name(self) -> str:
        return self.dom.name

    @property
    def uuid(self) -> str:
        return self.dom.uuid

    def info(self) -> DomainInfo:
        return parse_domain(self.dom.xml())

    def teams(self, info: DomainInfo | None = None) -> TeamSet:
        """The recorded teams (of `info`, when the caller has just read the domain)."""
        teams = (info or self.info()).teams
        if teams is None or not teams.teams:
            raise PreflightError(f"{self.name} has no ptmig teams: set one with 'ptmig team-set'")
        return teams

    def save_teams(self, teams: TeamSet) -> None:
        self.dom.set_metadata(TEAMS_NS, TEAMS_PREFIX, format_teams(teams))

    def set_primary(self, team: str, primary: PrimaryDevice | None) -> TeamSet:
        with self._lock:
            teams = self.teams()
            updated = teams.with_team(teams.team(team).with_primary(primary))
            self.save_teams(updated)
            return updated

    def classify(
        self, agent_state: pb.GetStateResponse | None = None, info: DomainInfo | None = None
    ) -> tuple[TeamClassification, ...]:
        """Each team as the live domain has it (and the agent, given its state); `info`:
        the live domain as the caller read it in this step."""
        info = info or self.info()
        teams = self.teams(info)
        pools = {t.pool: self.pool(t) for t in teams.teams}
        agent = {t.name: t for t in agent_state.teams} if agent_state is not None else None
        return classify_teams(info, pools, agent)

    def correct_record(self, found: TeamClassification, timeout: float = 30.0) -> Team:
        """Make the team's record say what the live domain has: adopt the device plugged
        by hand, forget the one that is gone (unplugged: out of the definition too, where
        a live-only detach left it).  Returns the team as now recorded."""
        if found.case is TeamCase.UNRECORDED:
            log.info("%s: %s", self.name, found.summary)
            return self.set_primary(found.team.name, found.device).team(found.team.name)
        if found.case is TeamCase.PRIMARY_ABSENT:
            log.info("%s: %s", self.name, found.summary)
            self.unplug(self.teams().team(found.team.name), timeout)
            return self.teams().team(found.team.name)
        return found.team  # as recorded, and as the domain has it

    def agent(self) -> AgentClient:
        with self._lock:
            if self._agent is None:
                self._agent = self.agent_for(self.dom, self.agent_timeout)
            return self._agent

    def close(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    # -- team operations -------------------------------------------------------------

    def pool(self, team: Team) -> Pool | None:
        """The team's pool on this host (None: not defined here), read once."""
        with self._pools_lock:
            if team.pool not in self._pools:
                self._pools[team.pool] = pool_on(self.hv, team)
            return self._pools[team.pool]

    def forget_pools(self) -> None:
        """Read the pools again when next asked (their definitions may have changed)."""
        with self._pools_lock:
            self._pools.clear()

    def plug(self, team: Team) -> PrimaryDevice | None:
        """Attach a free device of the team's pool and record it; None when none is free.

        The attach is the claim: libvirt refuses a PCI device or tap another domain holds,
        so two coordinators racing for the last device cannot both get it; the loser tries
        the next free slot.
        """
        with self._plug_lock:
            return self._plug(team)

    def _plug(self, team: Team) -> PrimaryDevice | None:
        pool = self.pool(team)
        if pool is None:
            log.info("%s: no pool %s on %s", self.name, team.pool, self.hv.uri)
            return None
        # Aliases must be unique in the live and the persistent definition alike (a stale
        # persistent device, e.g. one a plain libvirt migration carried over, keeps its).
        aliases: list[str | None] = []
        for xml in (self.dom.xml(), self.dom.xml(inactive=True)):
            info = parse_domain(xml)
            aliases += [i.alias for i in info.interfaces] + [h.alias for h in info.hostdevs]
        for slot in free_slots(pool, self.hv.all_domain_xml()):
            alias = next_primary_alias(team.name, aliases)
            vf_mac = team.team_mac or team.standby_mac
            attachment = attachment_for_slot(slot, alias=alias, vf_mac=vf_mac)
            try:
                self.dom.attach(attachment.device_xml)
            except HypervisorError as exc:
                log.info("%s: slot %s taken (%s); trying the next", self.name, slot, exc)
                aliases.append(alias)
                continue
            self.set_primary(team.name, attachment.primary)
            return attachment.primary
        return None

    def bind(
        self, team: Team, primary: PrimaryDevice, operation_id: str, timeout: float
    ) -> pb.BindPrimaryResponse:
        device = self.info().device(primary.alias)
        guest_pci = getattr(device, "guest_pci_address", None) or ""
        return self.agent().bind_primary(
            team.name,
            operation_id=operation_id,
            pci_address=guest_pci,
            mac=primary.mac or "",
            mac_policy=team.mac_policy,
            timeout=timeout,
        )

    def unplug(self, team: Team, timeout: float) -> float:
        """Detach the team's primary, wait until the guest released it, record its absence."""
        if team.primary is None:
            return 0.0
        seconds = self.dom.detach_and_wait(team.primary.alias, timeout)
        self.set_primary(team.name, None)
        return seconds

    def teams_on_primary(
        self, teams: Sequence[Team], info: DomainInfo | None = None
    ) -> dict[str, bool]:
        """Per team: its recorded primary is plugged and is the bond's active member; from
        one read of the domain and of the agent."""
        info = info or self.info()
        plugged = [t for t in teams if t.primary and info.device(t.primary.alias) is not None]
        states = {s.name: s for s in self.agent().state().teams} if plugged else {}
        out = dict.fromkeys((t.name for t in teams), False)
        for team in plugged:
            state = states.get(team.name)
            if state is None:
                raise WorkflowError(f"the agent in {self.name} does not know team {team.name!r}")
            out[team.name] = bool(state.active_member) and state.active_member == state.primary
        return out


T = TypeVar("T")


def each_team(teams: Sequence[Team], action: Callable[[Team], T]) -> dict[str, T]:
    """Run *action* for every team at once; raise the first failure after all have ended.

    Teams are independent bonds (the agent locks per team), and waiting for one e1000e's
    carrier (about 3 s) need not delay the next team's.
    """
    if len(teams) <= 1:
        return {t.name: action(t) for t in teams}
    with ThreadPoolExecutor(max_workers=len(teams), thread_name_prefix="team") as pool:
        # Each team's thread logs with the workflow's fields, and its own team's.
        futures = {t.name: pool.submit(in_this_context(_for_team(action)), t) for t in teams}
    errors = [f.exception() for f in futures.values() if f.exception() is not None]
    if errors:
        raise errors[0]  # type: ignore[misc]
    return {name: f.result() for name, f in futures.items()}


def _for_team(action: Callable[[Team], T]) -> Callable[[Team], T]:
    def run(team: Team) -> T:
        with log_fields(team=team.name):
            return action(team)

    return run


def to_primary(
    guest: GuestOnHost, team: Team, operation_id: str, timeout: float, emit: Callable[[str], None]
) -> TeamMode:
    """Bind the team's recorded primary if the domain has it, else plug and bind a device
    of its pool: never wait on a device the live domain does not have."""
    if team.primary is not None and guest.dom.has_device(team.primary.alias):
        guest.bind(team, team.primary, operation_id, timeout)
        return TeamMode.PRIMARY
    if team.primary is not None:
        emit(
            f"team {team.name}: recorded primary {team.primary.alias} is not plugged; "
            "plugging another"
        )
        guest.unplug(team, timeout)  # gone already: out of the definition and the record
        team = team.with_primary(None)
    pool = guest.pool(team)
    if isinstance(pool, VfNetworkPool) or team.mac_policy == MacPolicy.FOLLOW:
        state = next((t for t in guest.agent().state().teams if t.name == team.name), None)
        refusal = mac_policy_refusal(team, pool, state) if state is not None else None
        if refusal:
            emit(refusal)
            return TeamMode.STANDBY
    return plug_and_bind(guest, team, operation_id, timeout, emit).result


def pool_on(hv: Hypervisor, team: Team) -> Pool | None:
    """The team's pool as defined on *hv*'s host, None when that host has none."""
    xml = hv.network_xml(pool_network_name(team.pool))
    if xml is None:
        return None
    try:
        return parse_pool_network(xml)
    except DomainModelError as exc:
        raise WorkflowError(f"{hv.uri}: pool {team.pool}: {exc}") from exc


def mac_policy_refusal(team: Team, pool: Pool | None, state: pb.TeamState) -> str | None:
    """Why a device of *pool* could not join *team*'s bond as the guest has it, or None;
    checked before anything is unplugged, since the agent would refuse only at the bind.

    Policy follow needs a bond whose MAC follows its active member (fail_over_mac active).
    A VF keeps the MAC libvirt set through its PF (the team's, else the standby's): the PF
    refuses any other from the guest ("attempted to override administratively set MAC
    address").  A fail_over_mac=none bond gives each member its own MAC as it joins, so a
    VF can join it only when the bond's MAC is that one; an active bond takes the VF's.
    """
    if not state.mac:
        return None
    if team.mac_policy == MacPolicy.FOLLOW and state.fail_over_mac != "active":
        return (
            f"team {team.name}: MAC policy follow needs bond {state.bond} with fail_over_mac "
            f"active, it has {state.fail_over_mac or 'none'}: set the bond's fail_over_mac to "
            "active, or the team's policy to preserve (ptmig team-set --mac-policy preserve)"
        )
    if not isinstance(pool, VfNetworkPool) or state.fail_over_mac != "none":
        return None
    vf_mac = (team.team_mac or team.standby_mac).lower()
    if vf_mac == state.mac.lower():
        return None
    return (
        f"team {team.name}: a VF of pool {team.pool} gets MAC {vf_mac} through its PF and "
        f"cannot change it in the guest, but bond {state.bond} (fail_over_mac none) gives "
        f"its members its own MAC {state.mac.lower()}: set the team's MAC to the bond's "
        f"(ptmig team-set --team-mac {state.mac.lower()}), or give the bond {vf_mac}"
    )


def free_devices(hv: Hypervisor, pool: Pool | None) -> int:
    """How many devices of *pool* no domain on *hv*'s host uses (0 for no pool)."""
    return 0 if pool is None else len(free_slots(pool, hv.all_domain_xml()))


@dataclass(frozen=True)
class BindResult:
    """What plugging and binding a team's device came to: on its primary (the device the
    guest bound and its alias) or left on its standby (and why)."""

    team: str
    result: TeamMode  # PRIMARY or STANDBY
    detail: str = ""
    device: str = ""
    alias: str = ""

    def journal(self) -> dict[str, str]:
        """The journal's and the log's form: only the fields that say something."""
        out = {"team": self.team, "result": str(self.result)}
        if self.result is TeamMode.PRIMARY:
            return {**out, "device": self.device, "alias": self.alias}
        return {**out, "detail": self.detail}


def plug_and_bind(
    guest: GuestOnHost, team: Team, operation_id: str, timeout: float, emit: Callable[[str], None]
) -> BindResult:
    """Plug a device from the pool and bind it; on a failed bind, unplug it again."""
    primary = guest.plug(team)
    if primary is None:
        emit(f"team {team.name}: no free device in pool {team.pool}; stays on its standby")
        return BindResult(team.name, TeamMode.STANDBY, "no free device")
    team = team.with_primary(primary)
    try:
        reply = guest.bind(team, primary, operation_id, timeout)
    except Exception as exc:
        emit(f"team {team.name}: bind failed ({exc}); unplugging {primary.alias}")
        try:
            guest.unplug(team, timeout)
        except Exception as unplug_exc:
            log.error("unplug after failed bind: %s", unplug_exc)
        return BindResult(team.name, TeamMode.STANDBY, f"bind failed: {exc}")
    return BindResult(team.name, TeamMode.PRIMARY, device=reply.device, alias=primary.alias)
