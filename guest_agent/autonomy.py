"""Guest-managed teams: the agent keeps them whole when someone else moves their devices.

Under Nova, KubeVirt or a plain `virsh detach-device` / `attach-device` nobody calls the
agent: the orchestrator unplugs a team's primary before a migration and plugs another
after it.  For teams configured `managed_by = "guest"` a watcher thread waits on the same
link events the coordinated bind waits on (`Links.wait_for`: rtnetlink RTM_NEWLINK /
RTM_DELLINK and udev's monitor group, no polling), compares each dump with the last, and:

- a team's primary gone (link removed: hot-unplug, surprise removal), released from the
  bond, or without carrier (driver reset): confirms the team is on its standby through
  `Teams.use_standby` (the bond's own failover has normally done it already) and records
  why, which GetState reports;
- a NIC that appeared (an ifindex not seen before, once udev has finished with it), free
  (no master, no bond, no team's standby or configured `primary`) and matching exactly one
  guest-managed team's rule: binds it with that team's MAC policy through `Teams.adopt`,
  BindPrimary's own path under the team's lock, so a coordinator's BindPrimary of the same
  NIC and the agent's never race: whoever comes second finds it done.  A NIC that matches
  two teams or none is left alone and logged, once;
- a guest-managed primary whose carrier came back while its standby is active is made
  active again by the same path.

A NIC the agent saw free before and that was later released is not bound again: someone
released it on purpose.  With no guest-managed team the watcher does not run at all.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from guest_agent.links import Link, LinkError, Links, WaitTimeout, by_index
from guest_agent.rules import ManagedBy
from guest_agent.teams import TeamError, TeamEvent, TeamLayout, Teams, deadline_in

log = logging.getLogger(__name__)

#: A wait with no link event ends after this and the links are read again anyway: a
#: safety net for an event the kernel dropped (ENOBUFS is handled by the wait itself).
IDLE_REREAD_S = 300.0
#: After a netlink failure (not a team's), before the watcher reads the links again.
RETRY_S = 1.0


class PrimaryLost(NamedTuple):
    team: str
    device: str
    reason: str


class Plugged(NamedTuple):
    team: str
    link: Link
    reason: str


Action = PrimaryLost | Plugged


class _Seen(NamedTuple):
    """A guest-managed team's primary at the last dump: which link, in the bond, carrier."""

    index: int  # type: ignore[assignment]  # shadows tuple.index(), as Link.index
    name: str
    carrier: bool


def _read_whole(link: Link) -> bool:
    """Whether *link* was read as it will stay: udev has finished with it, and its device
    was found in sysfs unless it has none.  A dump's names are from before its sysfs reads,
    so a NIC renamed by udev in between (eth0 -> enp8s0) shows without its PCI address,
    driver or IDs; it is judged again at the next event (the rename's), not forgotten."""
    return link.udev_initialized and (
        link.kind is not None or link.pci_address is not None or link.name == "lo"
    )


class Watcher:
    """The thread that acts for guest-managed teams; `step` is its pure part."""

    def __init__(
        self,
        teams: Teams,
        links: Links,
        timeout_s: float,
        clock: Callable[[], float] = time.time,
        on_event: Callable[[str, TeamEvent], None] | None = None,
    ) -> None:
        self._teams = teams
        self._links = links
        self._timeout_s = timeout_s
        self._clock = clock
        self._on_event = on_event  # besides Teams.record: tests wait on it
        self._stop = threading.Event()
        self._known: set[int] = set()  # ifindexes seen (udev done): not "appeared" again
        self._reported: set[int] = set()  # NICs left alone, logged once
        self._pending: set[int] = set()  # NICs seen before udev finished, logged once
        self._primaries: dict[str, _Seen | None] = {}
        self._first = True
        self.thread: threading.Thread | None = None

    def start(self) -> threading.Thread:
        self.thread = threading.Thread(target=self.run, name="autonomy", daemon=True)
        self.thread.start()
        return self.thread

    def stop(self) -> None:
        """Ask the thread to end at its next wake-up (it is a daemon: nothing waits on it)."""
        self._stop.set()

    def run(self) -> None:
        log.info("autonomy: watching guest-managed teams for their devices")
        while not self._stop.is_set():
            try:
                actions = self._links.wait_for(self._check, deadline_in(IDLE_REREAD_S))
            except WaitTimeout:
                continue
            except LinkError as exc:
                log.warning("autonomy: reading links failed (%s); again in %.0f s", exc, RETRY_S)
                self._stop.wait(RETRY_S)
                continue
            except Exception:  # a dead watcher would leave the teams to nobody: log, go on
                log.exception("autonomy: unexpected failure; watching again in %.0f s", RETRY_S)
                self._stop.wait(RETRY_S)
                continue
            for action in actions:
                if self._stop.is_set():
                    return
                self.act(action)

    def _check(self, links: list[Link]) -> list[Action] | None:
        if self._stop.is_set():
            return []
        return self.step(links) or None

    # -- what changed --------------------------------------------------------

    def step(self, links: list[Link]) -> list[Action]:
        """Compare *links* with the last dump; the actions due, in order."""
        layouts = self._teams.layouts(links)
        guest = [ly for ly in layouts if ly.config.managed_by is ManagedBy.GUEST]
        actions: list[Action] = []
        for layout in guest:
            actions.extend(self._primary_change(layout, links))
        actions.extend(self._appeared(layouts, guest, links))
        present = {ln.index for ln in links}
        self._known = {ln.index for ln in links if _read_whole(ln)}
        self._reported &= present
        self._pending &= present - self._known
        self._first = False
        return actions

    def _primary_change(self, layout: TeamLayout, links: list[Link]) -> list[Action]:
        name = layout.config.name
        standby = layout.standby.index if layout.standby else None
        now = next((ln for ln in layout.members if ln.index != standby), None)
        before = self._primaries.get(name)
        self._primaries[name] = _Seen(now.index, now.name, now.carrier) if now else None
        active = layout.bond.bond.active_slave if layout.bond and layout.bond.bond else None
        if before is not None and (now is None or now.index != before.index):
            gone = by_index(links, before.index)
            if gone is None:
                reason = f"{before.name} removed (hot-unplug or surprise removal)"
            else:
                reason = f"{before.name} released from {layout.config.bond}"
            return [PrimaryLost(name, before.name, reason)]
        if now is None:
            return []
        if before is not None and before.carrier and not now.carrier:
            return [PrimaryLost(name, now.name, f"{now.name} lost its carrier (link down, reset)")]
        if now.carrier and active != now.index and (before is None or not before.carrier):
            return [Plugged(name, now, f"{now.name}, a member, has its carrier again")]
        return []

    def _appeared(
        self, layouts: list[TeamLayout], guest: list[TeamLayout], links: list[Link]
    ) -> list[Action]:
        taken = {ly.standby.index for ly in layouts if ly.standby}
        bonds = {ly.bond.index for ly in layouts if ly.bond}
        actions: list[Action] = []
        for link in links:
            new = link.index not in self._known and link.index not in self._reported
            if not new or link.kind is not None:
                continue
            if not link.udev_initialized:
                if link.pci_address and link.index not in self._pending:
                    self._pending.add(link.index)
                    log.info("autonomy: %s appeared; waiting for udev to finish", link.name)
                continue
            if link.master is not None or link.index in taken or link.index in bonds:
                continue
            if link.pci_address is None:  # lo, tun, a veth: no device an orchestrator plugs
                continue
            if any(ly.config.primary and ly.config.primary.matches(link) for ly in layouts):
                continue  # another team's configured primary (agent-owned), even unbound
            teams = [ly.config for ly in guest if ly.config.primary_rule is not None]
            matching = [t.name for t in teams if t.primary_rule and t.primary_rule.matches(link)]
            what = f"{link.name} ({link.pci_address}, {link.pci_id}, {link.driver})"
            when = "present at start" if self._first else "plugged"
            if len(matching) == 1:
                actions.append(Plugged(matching[0], link, f"{what} {when}, matches its rule"))
                continue
            self._reported.add(link.index)
            if matching:
                log.warning(
                    "autonomy: %s %s matches teams %s; leaving it alone",
                    what,
                    when,
                    ", ".join(matching),
                )
            else:
                log.info("autonomy: %s %s matches no guest-managed team; left alone", what, when)
        return actions

    # -- acting --------------------------------------------------------------

    def act(self, action: Action) -> None:
        """Do *action* under its team's lock and record the outcome for GetState."""
        started = time.monotonic()
        deadline = deadline_in(self._timeout_s)
        kind = "primary-lost" if isinstance(action, PrimaryLost) else "primary-bound"
        device = action.device if isinstance(action, PrimaryLost) else action.link.name
        log.info("autonomy: team %s: %s", action.team, action.reason)
        try:
            if isinstance(action, PrimaryLost):
                state = self._teams.use_standby(action.team, False, deadline).team
                detail = f"on standby {state.active_member}"
            else:
                result = self._teams.adopt(action.team, action.link.index, deadline)
                if result is None:
                    log.info("autonomy: team %s: nothing to do for %s", action.team, device)
                    return
                device = result.device  # the name after udev's rename, read by the bind
                detail = f"{result.device} bound and active, team MAC {result.team.mac}"
            ok = True
        except TeamError as exc:
            ok, detail = False, str(exc)
        took = (time.monotonic() - started) * 1000
        level = logging.INFO if ok else logging.ERROR
        log.log(level, "autonomy: team %s: %s: %s (%.0f ms)", action.team, kind, detail, took)
        event = TeamEvent(kind, device, action.reason, ok, detail, int(self._clock() * 1000))
        self._teams.record(action.team, event)
        if self._on_event is not None:
            self._on_event(action.team, event)
