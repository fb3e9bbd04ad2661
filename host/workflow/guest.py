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
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from host.agent_client import AgentClient, AgentOnDemand, GuestState, TeamState
from host.domain.devices import attachment_for_slot, next_primary_alias
from host.domain.domain_xml import DomainInfo, parse_domain
from host.domain.kinds import MacPolicy
from host.domain.pools import Pool, Slot, VfNetworkPool
from host.domain.teams import TEAMS_NS, TEAMS_PREFIX, PrimaryDevice, Team, TeamSet, format_teams
from host.hypervisor import Domain, Hypervisor, HypervisorError
from host.logfields import in_this_context, log_fields
from host.workflow.drift import TeamCase, TeamClassification, classify_teams
from host.workflow.errors import PreflightError, WorkflowError
from host.workflow.inventory import DeviceView, pool_on
from host.workflow.lease import LEASE_TTL, DomainLease, LeaseHeld
from host.workflow.macpolicy import mac_policy_refusal
from host.workflow.model import BindTiming, TeamMode

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long one call into a guest's agent may take, unless the call says otherwise.
AGENT_TIMEOUT = 15.0
#: Deadlines of the team operations (the agent's calls carry them into the guest).
UNPLUG_TIMEOUT = 30.0
BIND_TIMEOUT = 30.0
SWITCH_TIMEOUT = 15.0
NO_FREE_DEVICE = "no free device"
#: How long the binds' step waits at most for its early opening of the agent's channel.
WARM_TIMEOUT = 5.0


@dataclass(frozen=True)
class BindResult:
    """What plugging and binding a team's device came to: on its primary (the device the
    guest bound and its alias) or left on its standby (and why)."""

    team: str
    result: TeamMode  # PRIMARY or STANDBY
    detail: str = ""
    device: str = ""
    alias: str = ""
    #: When a device was plugged: its attach and bind on the coordinator's clock.
    timing: BindTiming | None = None

    def journal(self) -> dict[str, str]:
        """The journal's and the log's form: only the fields that say something."""
        out = {"team": self.team, "result": str(self.result)}
        if self.result is TeamMode.PRIMARY:
            return {**out, "device": self.device, "alias": self.alias}
        return {**out, "detail": self.detail}


@dataclass(frozen=True)
class Plugged:
    """One team's plug in :meth:`Guest.plug_all`: its device (None: none, and why), and its
    attach call's start and return (epoch s)."""

    primary: PrimaryDevice | None
    detail: str = ""
    attach_called: float = 0.0
    attach_returned: float = 0.0


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
        #: One plug step at a time per domain: free slots are computed from the domain's own
        #: XML (a plug step attaches every team's device in one go: plug_all).
        self._plug_lock = threading.Lock()
        #: One detach at a time per domain (see :meth:`unplug`); taken inside _plug_lock.
        self._detach_lock = threading.Lock()

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
        return self.set_primaries({team: primary})

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

    def plug_all(self, teams: Sequence[Team]) -> dict[str, Plugged]:
        """Attach a free device of each team's pool in one go, then record them all.

        One read of the domain and of the host's domains for every team, the attaches
        back to back, one metadata write: the guest sees the devices arrive together and
        probes them side by side, where one plug after another made the last team wait
        for the others' reads and writes.  The attach is the claim: libvirt refuses a PCI
        device or tap another domain holds, so two coordinators racing for the last
        device cannot both get it; the loser tries the next free slot.  A team whose plug
        fails gets no device and a reason; the others' devices are recorded all the same,
        and a device whose record cannot be written is unplugged again, so none is left
        attached and unknown (a crash in between leaves it to drift's `unrecorded` case,
        its alias ptmig's).
        """
        with self._plug_lock:
            plugged = self._attach_all(teams)
            attached = {n: p.primary for n, p in plugged.items() if p.primary is not None}
            if not attached:
                return plugged
            try:
                self.set_primaries(attached)
            except Exception as exc:
                log.error("%s: recording the plugged devices failed: %s", self.name, exc)
                for team in teams:
                    primary = attached.get(team.name)
                    if primary is None:
                        continue
                    try:
                        with self._detach_lock:
                            self.dom.detach_and_wait(primary.alias, BIND_TIMEOUT)
                    except Exception as unplug_exc:
                        log.error("unplug of unrecorded %s: %s", primary.alias, unplug_exc)
                    plugged[team.name] = Plugged(None, f"recording the device failed: {exc}")
            return plugged

    def _attach_all(self, teams: Sequence[Team]) -> dict[str, Plugged]:
        """Each team's attach, from one read of the domain and of the host's domains.  An
        error reading those is every team's (nothing attached yet); one team's own error
        (its pool, its device XML) is that team's alone."""
        # Aliases must be unique in the live and the persistent definition alike (a stale
        # persistent device, e.g. one a plain libvirt migration carried over, keeps its).
        aliases: list[str | None] = []
        for xml in (self.dom.xml(), self.dom.xml(inactive=True)):
            info = parse_domain(xml)
            aliases += [i.alias for i in info.interfaces] + [h.alias for h in info.hostdevs]
        view = DeviceView.read(self.hv)
        free: dict[str, Iterator[Slot]] = {}  # per pool, the slots this step has not tried
        out = {}
        for team in teams:
            try:
                out[team.name] = self._attach_one(team, aliases, view, free)
            except Exception as exc:
                log.error("%s: plugging a device for team %s: %s", self.name, team.name, exc)
                out[team.name] = Plugged(None, f"plug failed: {exc}")
        return out

    def _attach_one(
        self,
        team: Team,
        aliases: list[str | None],
        view: DeviceView,
        free: dict[str, Iterator[Slot]],
    ) -> Plugged:
        pool = self.pool(team)
        if pool is None:
            log.info("%s: no pool %s on %s", self.name, team.pool, self.hv.uri)
            return Plugged(None, NO_FREE_DEVICE)
        if pool.name not in free:
            free[pool.name] = iter(view.free_slots(pool))
        for slot in free[pool.name]:
            alias = next_primary_alias(team.name, aliases)
            aliases.append(alias)
            vf_mac = team.team_mac or team.standby_mac
            attachment = attachment_for_slot(slot, alias=alias, vf_mac=vf_mac)
            called = time.time()
            try:
                self.dom.attach(attachment.device_xml)
            except HypervisorError as exc:
                log.info("%s: slot %s taken (%s); trying the next", self.name, slot, exc)
                continue
            return Plugged(attachment.primary, "", called, time.time())
        return Plugged(None, NO_FREE_DEVICE)

    def set_primaries(self, primaries: Mapping[str, PrimaryDevice | None]) -> TeamSet:
        """Record several teams' primaries in one metadata write."""
        with self._lock:
            teams = self.teams()
            for name, primary in primaries.items():
                teams = teams.with_team(teams.team(name).with_primary(primary))
            self.save_teams(teams)
            return teams

    def bind(
        self,
        team: Team,
        primary: PrimaryDevice,
        operation_id: str,
        timeout: float,
        info: DomainInfo | None = None,
    ) -> str:
        """The agent binds the plugged *primary* into the team's bond; returns the guest's
        name for the device.  *info*: the live domain read after the plug."""
        device = (info or self.info()).device(primary.alias)
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
        """Detach the team's primary, wait until the guest released it, record its absence.

        One detach at a time per domain: a detach waits on the domain's DEVICE_REMOVED
        event, and libvirt refuses a second registration of that event for the same
        domain on the same connection ("event callback already tracked": two teams'
        binds failing together in the lab's fault matrix, each unplugging its device).
        """
        if team.primary is None:
            return 0.0
        with self._detach_lock:
            seconds = self.dom.detach_and_wait(team.primary.alias, timeout)
        self.set_primary(team.name, None)
        return seconds

    def plug_and_bind_all(
        self,
        teams: Sequence[Team],
        operation_id: Callable[[str], str],
        timeout: float,
        emit: Callable[[str], None],
    ) -> dict[str, BindResult]:
        """Plug every team's device in one step (:meth:`plug_all`), then bind them all at
        once (the agent locks per team); a failed bind unplugs its own device only.

        The agent's channel is opened while the devices go in (:meth:`_warm_agent`): on
        a destination that is its first use, a stream and a handshake through a busy
        guest, which the first bind would otherwise wait for.
        """
        with (
            self.dom.devices_added() as added,
            ThreadPoolExecutor(1, thread_name_prefix="agent-warm") as warm,
        ):
            warm.submit(in_this_context(self._warm_agent))
            plugged = self.plug_all(teams)
            info = self.info() if any(p.primary for p in plugged.values()) else None

            def bind(team: Team) -> BindResult:
                got = plugged[team.name]
                if got.primary is None:
                    why = (
                        f"{got.detail} in pool {team.pool}"
                        if got.detail == NO_FREE_DEVICE
                        else got.detail
                    )
                    emit(f"team {team.name}: {why}; stays on its standby")
                    return BindResult(team.name, TeamMode.STANDBY, got.detail)
                team = team.with_primary(got.primary)
                return self._bind_plugged(
                    team, got, operation_id(team.name), timeout, emit, info, added
                )

            return self.each_team(teams, bind)

    def _warm_agent(self) -> None:
        """Open the agent's channel and its connection (one Health call); a failure is
        only logged: the binds meet it again and answer for it."""
        try:
            self.agent().healthy(timeout=WARM_TIMEOUT)
        except Exception as exc:
            log.info("%s: the agent's channel did not open ahead of the binds: %s", self.name, exc)

    def _bind_plugged(
        self,
        team: Team,
        got: Plugged,
        operation_id: str,
        timeout: float,
        emit: Callable[[str], None],
        info: DomainInfo | None,
        added: dict[str, float],
    ) -> BindResult:
        primary = got.primary
        assert primary is not None
        called = time.time()

        def timing() -> BindTiming:
            return BindTiming(
                got.attach_called,
                got.attach_returned,
                added.get(primary.alias),
                called,
                time.time(),
            )

        try:
            device = self.bind(team, primary, operation_id, timeout, info)
        except Exception as exc:
            ended = timing()
            emit(f"team {team.name}: bind failed ({exc}); unplugging {primary.alias}")
            try:
                self.unplug(team, timeout)
            except Exception as unplug_exc:
                log.error("unplug after failed bind: %s", unplug_exc)
            return BindResult(
                team.name,
                TeamMode.STANDBY,
                f"bind failed: {exc}",
                timing=ended,
            )
        return BindResult(
            team.name,
            TeamMode.PRIMARY,
            device=device,
            alias=primary.alias,
            timing=timing(),
        )

    def to_primaries(
        self,
        teams: Sequence[Team],
        operation_id: Callable[[str], str],
        timeout: float,
        emit: Callable[[str], None],
    ) -> dict[str, BindResult]:
        """Every team back on a primary: a recorded primary the live domain has is bound
        (never waited on when it has not); the others get devices of their pools plugged
        in one step and bound together (:meth:`plug_and_bind_all`), as a migration's bind
        step does.  A team its MAC policy bars from its pool's devices stays on its
        standby, and says why."""
        recorded: list[Team] = []
        to_plug: list[Team] = []
        out: dict[str, BindResult] = {}
        states: dict[str, TeamState] | None = None
        for team in teams:
            if team.primary is not None and self.dom.has_device(team.primary.alias):
                recorded.append(team)
                continue
            if team.primary is not None:
                emit(
                    f"team {team.name}: recorded primary {team.primary.alias} is not plugged; "
                    "plugging another"
                )
                self.unplug(team, timeout)  # gone already: out of the definition and the record
                team = team.with_primary(None)
            pool = self.pool(team)
            if isinstance(pool, VfNetworkPool) or team.mac_policy == MacPolicy.FOLLOW:
                if states is None:
                    states = {s.name: s for s in self.agent().state().teams}
                state = states.get(team.name)
                refusal = mac_policy_refusal(team, pool, state) if state is not None else None
                if refusal:
                    emit(refusal)
                    out[team.name] = BindResult(team.name, TeamMode.STANDBY, refusal)
                    continue
            to_plug.append(team)

        def bind_recorded(team: Team) -> BindResult:
            assert team.primary is not None
            self.bind(team, team.primary, operation_id(team.name), timeout)
            return BindResult(team.name, TeamMode.PRIMARY, alias=team.primary.alias)

        def plug_and_bind() -> dict[str, BindResult]:
            return self.plug_and_bind_all(to_plug, operation_id, timeout, emit)

        def bind_all_recorded() -> dict[str, BindResult]:
            return self.each_team(recorded, bind_recorded)

        wanted = ((plug_and_bind, to_plug), (bind_all_recorded, recorded))
        jobs = [job for job, teams_of_job in wanted if teams_of_job]
        if len(jobs) == 1:
            out.update(jobs[0]())
        elif jobs:  # the plugged devices' binds and the recorded ones' at the same time
            with ThreadPoolExecutor(len(jobs), thread_name_prefix="to-primary") as executor:
                futures = [executor.submit(in_this_context(job)) for job in jobs]
            errors = [e for e in (f.exception() for f in futures) if e is not None]
            if errors:
                raise errors[0]
            for future in futures:
                out.update(future.result())
        return {t.name: out[t.name] for t in teams}

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
