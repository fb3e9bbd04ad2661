"""One domain on one host as every workflow works on it: the :class:`Guest`.

As nova's ``virt/libvirt/guest.py`` wraps one libvirt domain, a Guest wraps one domain
as seen through one host's libvirt, with what a workflow needs beside it, each given at
construction: its hypervisor :class:`~host.hypervisor.Domain`, its guest agent
(:class:`~host.agent_client.AgentOnDemand`) and, once taken, its lease.  Migration,
failover, rollback, recovery and the reconciler all plug, bind and unplug primaries the
same way, through its methods.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from host.agent_client import AgentClient, AgentOnDemand, GuestState, TeamState
from host.domain.devices import attachment_for_slot, next_primary_alias
from host.domain.domain_xml import DomainInfo, parse_domain
from host.domain.kinds import MacPolicy
from host.domain.pools import Pool, VfNetworkPool
from host.domain.teams import TEAMS_NS, TEAMS_PREFIX, PrimaryDevice, Team, TeamSet, format_teams
from host.hypervisor import Domain, Hypervisor, HypervisorError
from host.logfields import in_this_context, log_fields
from host.workflow.drift import TeamCase, TeamClassification, classify_teams
from host.workflow.errors import PreflightError, WorkflowError
from host.workflow.inventory import DeviceView, pool_on
from host.workflow.lease import LEASE_TTL, DomainLease, LeaseHeld
from host.workflow.macpolicy import mac_policy_refusal
from host.workflow.model import TeamMode

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long one call into a guest's agent may take, unless the call says otherwise.
AGENT_TIMEOUT = 15.0
#: Deadlines of the team operations (the agent's calls carry them into the guest).
UNPLUG_TIMEOUT = 30.0
BIND_TIMEOUT = 30.0
SWITCH_TIMEOUT = 15.0


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


class Guest:
    """A domain on one host, its agent, its teams and its lease.

    The teams' pools on this host are read once until :meth:`forget_pools` (a workflow
    calls it at each step): teams bound in parallel share one read, and the claim on a
    device is the attach anyway.
    """

    def __init__(
        self,
        hv: Hypervisor,
        dom: Domain,
        agent: AgentOnDemand,
        lease: DomainLease | None = None,
    ) -> None:
        self.hv = hv
        self.dom = dom
        self._agent = agent
        #: The workflow's lease on this domain: taken here, or carried over from the
        #: source's Guest when the domain has migrated.
        self.lease = lease
        self._pools: dict[str, Pool | None] = {}
        self._pools_lock = threading.Lock()
        #: Teams are worked on in parallel; the metadata is one document, read-modify-written.
        self._lock = threading.Lock()
        #: One plug at a time per domain: free slots are computed from the domain's own XML.
        self._plug_lock = threading.Lock()

    @property
    def name(self) -> str:
        return self.dom.name

    @property
    def uuid(self) -> str:
        return self.dom.uuid

    def agent(self) -> AgentClient:
        """The guest's agent, its channel opened at the first call."""
        return self._agent.client()

    def close(self) -> None:
        """Close the agent's channel (one client per guest and host at a time)."""
        self._agent.close()

    # -- the lease ---------------------------------------------------------------------

    def take_lease(self, lease: DomainLease, ttl: float = LEASE_TTL) -> None:
        """Take *lease* on this domain, or raise LeaseHeld naming its holder (and hold none:
        a take that failed otherwise may have written ours, which release then removes)."""
        self.lease = lease
        try:
            lease.take(self.dom, ttl)
        except LeaseHeld:
            self.lease = None
            raise

    def renew_lease(self, ttl: float = LEASE_TTL) -> None:
        """Between steps: extend the lease, or raise LeaseLost if another workflow has it."""
        if self.lease is not None:
            self.lease.renew(self.dom, ttl)

    def release_lease(self) -> None:
        """Give the lease back where this host still has the domain; never raises."""
        if self.lease is None:
            return
        try:
            defined = self.hv.has_domain(self.uuid)
        except HypervisorError as exc:
            log.warning("lease: %s: %s", self.hv.uri, exc)
            return
        if defined:
            self.lease.release(self.dom)

    # -- the record and the live domain -------------------------------------------------

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
        self, agent_state: GuestState | None = None, info: DomainInfo | None = None
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

    # -- team operations -----------------------------------------------------------------

    def each_team(self, teams: Sequence[Team], action: Callable[[Team], T]) -> dict[str, T]:
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

    def use_standby(
        self, team: Team, operation_id: str, timeout: float, *, release_primary: bool
    ) -> TeamState:
        """The agent moves the team's bond onto its standby (and lets go of the primary)."""
        reply = self.agent().use_standby(
            team.name,
            release_primary=release_primary,
            operation_id=operation_id,
            timeout=timeout,
        )
        return reply.team

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
        for slot in DeviceView.read(self.hv).free_slots(pool):
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

    def bind(self, team: Team, primary: PrimaryDevice, operation_id: str, timeout: float) -> str:
        """The agent binds the plugged *primary* into the team's bond; returns the guest's
        name for the device."""
        device = self.info().device(primary.alias)
        guest_pci = getattr(device, "guest_pci_address", None) or ""
        reply = self.agent().bind_primary(
            team.name,
            operation_id=operation_id,
            pci_address=guest_pci,
            mac=primary.mac or "",
            mac_policy=team.mac_policy,
            timeout=timeout,
        )
        return reply.device

    def unplug(self, team: Team, timeout: float) -> float:
        """Detach the team's primary, wait until the guest released it, record its absence."""
        if team.primary is None:
            return 0.0
        seconds = self.dom.detach_and_wait(team.primary.alias, timeout)
        self.set_primary(team.name, None)
        return seconds

    def plug_and_bind(
        self, team: Team, operation_id: str, timeout: float, emit: Callable[[str], None]
    ) -> BindResult:
        """Plug a device from the pool and bind it; on a failed bind, unplug it again."""
        primary = self.plug(team)
        if primary is None:
            emit(f"team {team.name}: no free device in pool {team.pool}; stays on its standby")
            return BindResult(team.name, TeamMode.STANDBY, "no free device")
        team = team.with_primary(primary)
        try:
            device = self.bind(team, primary, operation_id, timeout)
        except Exception as exc:
            emit(f"team {team.name}: bind failed ({exc}); unplugging {primary.alias}")
            try:
                self.unplug(team, timeout)
            except Exception as unplug_exc:
                log.error("unplug after failed bind: %s", unplug_exc)
            return BindResult(team.name, TeamMode.STANDBY, f"bind failed: {exc}")
        return BindResult(team.name, TeamMode.PRIMARY, device=device, alias=primary.alias)

    def to_primary(
        self, team: Team, operation_id: str, timeout: float, emit: Callable[[str], None]
    ) -> TeamMode:
        """Bind the team's recorded primary if the domain has it, else plug and bind a
        device of its pool: never wait on a device the live domain does not have."""
        if team.primary is not None and self.dom.has_device(team.primary.alias):
            self.bind(team, team.primary, operation_id, timeout)
            return TeamMode.PRIMARY
        if team.primary is not None:
            emit(
                f"team {team.name}: recorded primary {team.primary.alias} is not plugged; "
                "plugging another"
            )
            self.unplug(team, timeout)  # gone already: out of the definition and the record
            team = team.with_primary(None)
        pool = self.pool(team)
        if isinstance(pool, VfNetworkPool) or team.mac_policy == MacPolicy.FOLLOW:
            state = self.agent().state().team(team.name)
            refusal = mac_policy_refusal(team, pool, state) if state is not None else None
            if refusal:
                emit(refusal)
                return TeamMode.STANDBY
        return self.plug_and_bind(team, operation_id, timeout, emit).result

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
            out[team.name] = state.on_primary
        return out


def _for_team(action: Callable[[Team], T]) -> Callable[[Team], T]:
    def run(team: Team) -> T:
        with log_fields(team=team.name):
            return action(team)

    return run
