"""Live migration of a domain with passthrough NICs, as readable steps.

    preflight          classify each team by the live domain (host/workflow/drift.py);
                       refuse early with a clear message; correct the team record only
    switch             agent: every team on a plugged primary onto its standby
                                                               undo: bind the primary again
    unplug             detach each plugged primary, wait for DEVICE_REMOVED (gone = done)
                                                               undo: plug a source device for
                                                               every team at once, bind all
    migrate            libvirt peer-to-peer, persistent at the destination
    -- point of no return: the VM runs on the destination --
    plug + bind        a device from each team's destination pool, all attached in one
                       step and recorded in one write; the agent binds them in parallel
    verify             every team's active member is its primary (or it is degraded)

Before the migration has moved the VM, a failure undoes the done steps in reverse order
and the VM stays on the source, back on a passthrough device where one is free.  After
it, there is nothing to undo: a team that cannot get a device stays on its standby
(done-degraded) and the reconciler repairs it later.  A migration that fails once it
has switched to post-copy (``--postcopy``) is neither: the source is paused with stale
memory, so nothing is undone and the report (failed) and the journal say what the
operator can still do (resume the post-copy, or destroy and start the VM).  A team that
came degraded (its primary gone) is neither switched nor unplugged, and gets a
destination device like any.
A rollback is rolled-back when the domain is as it was before the workflow: every team
that was on a primary is on one again, degraded teams stay degraded.

Cancel (``ptmig cancel``, the Cancel RPC, SIGINT/SIGTERM on ``ptmig migrate``) is asked
through *cancelled*, which the workflow polls between steps and, during the migration
job, every :data:`CANCEL_POLL_S`: before the point of no return it aborts the job
(virDomainAbortJob) or stops before the next step and rolls back, the report saying
``cancelled``; after it, the bind finishes.  Between steps the workflow also renews its
lease on the domain through the source's Guest (the destination's once the VM moved) and
stops if another coordinator has it; :meth:`MigrationWorkflow.run` gives it back as it
ends, wherever the domain is.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from host.domain.domain_xml import retarget_hostdev, strip_primary
from host.domain.teams import Team
from host.hypervisor import Hypervisor, HypervisorError, PostcopyFailed
from host.migration_job import MigrationProgress
from host.migration_options import MigrationStats
from host.workflow.drift import TeamClassification
from host.workflow.errors import PreflightError, WorkflowError
from host.workflow.guest import BIND_TIMEOUT, SWITCH_TIMEOUT, UNPLUG_TIMEOUT, Guest
from host.workflow.hybrid import (
    Forced,
    TeamWay,
    Way,
    kept,
    moves,
    passengers_blocked,
    still_blocked,
)
from host.workflow.lease import JOB_LEASE_TTL, DomainLease
from host.workflow.model import (
    BindTiming,
    Event,
    MigrationReport,
    MigrationRequest,
    Outcome,
    TeamMode,
    plain,
    team_modes,
)
from host.workflow.preflight import active_on, preflight
from host.workflow.steps import JournalLike, Step, StepRunner

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a failed migration may leave the domain active on both hosts.
SETTLE_TIMEOUT = 90.0
#: How often a cancel is looked for while the migration job runs.
CANCEL_POLL_S = 0.25


class Cancelled(WorkflowError):
    """A cancel was asked before the point of no return: stop and roll back."""


def _never() -> str:
    return ""


#: How a workflow gets the Guest of a domain on a host, holding a lease (Runtime.guest).
GuestOpener = Callable[[Hypervisor, str, DomainLease | None], Guest]


class MigrationWorkflow:
    """One migration of *source* (a Guest, its lease taken) to *destination*'s host, where
    *open_guest* gives the Guest the domain becomes when it arrives."""

    def __init__(
        self,
        request: MigrationRequest,
        journal: JournalLike,
        workflow_id: str,
        source: Guest,
        destination: Hypervisor,
        open_guest: GuestOpener,
        on_event: Callable[[Event], None],
        *,
        cancelled: Callable[[], str] = _never,
    ) -> None:
        #: Who asked to cancel ("" while nobody has): polled, never waited on.
        self.cancelled = cancelled
        self.cancel_reason = ""
        self.request = request
        self.source_hv = source.hv
        self.destination_hv = destination
        self.open_guest = open_guest
        self.runner = StepRunner(workflow_id, journal, on_event, moving_step="migrate")
        self.source = source
        self.destination: Guest | None = None
        self.teams: list[Team] = []
        self.recorded_before: list[Team] = []  # as the metadata had them, before corrections
        self.classification: dict[str, TeamClassification] = {}  # preflight's case per team
        self.on_primary_before: set[str] = set()  # teams the guest had on a primary
        self.plugged_before: set[str] = set()  # teams with a device plugged
        self.moved: list[str] = []  # teams switched to standby
        self.unplugged: list[str] = []
        #: Each team's way through the migration (host/workflow/hybrid.py), from preflight;
        #: reported only when the hybrid was in play (a pool here allows a state copy, or
        #: the operator forced the switch).
        self.ways: dict[str, TeamWay] = {}
        #: The domain's mediated devices carried by a state copy, by UUID (hybrid.py).
        self.passengers: dict[str, TeamWay] = {}
        self.hybrid_considered = False
        self.migration: MigrationStats | None = None
        #: Each plugged team's bind on the coordinator's clock, for the report.
        self.binds: dict[str, BindTiming] = {}

    @property
    def workflow_id(self) -> str:
        return self.runner.workflow_id

    def op(self, step: str, team: str) -> str:
        """Operation ids are stable per workflow step: a retried call is idempotent."""
        return f"{self.workflow_id}:{step}:{team}"

    # -- steps -----------------------------------------------------------------------

    def preflight(self) -> dict[str, Any]:
        found = preflight(
            self.source,
            self.destination_hv,
            lambda m: self.runner.emit("preflight", "info", m),
            Forced(self.request.switch_all, frozenset(self.request.switch_teams)),
        )
        self.recorded_before = list(found.recorded_before)
        self.teams = list(found.teams)
        self.classification = found.classification
        self.plugged_before = set(found.plugged_before)
        self.on_primary_before = set(found.on_primary_before)
        plan = found.plan
        self.ways, self.hybrid_considered = plan.ways, plan.considered
        self.passengers = plan.passengers
        data = found.journal()
        if self.hybrid_considered:
            for name, way in self.ways.items():
                self.runner.emit("preflight", "info", f"team {name}: {way.line()}")
            for uuid, way in self.passengers.items():
                self.runner.emit("preflight", "info", f"mdev {uuid}: {way.line()}")
            data["ways"], data["devices"] = self._ways(), self._devices()
        copied = [*kept(self.ways), *(f"mdev {u}" for u in self.passengers)]
        if copied:
            data["detail"] += f"; state copied for {', '.join(copied)}"
        return data

    def switch_to_standby(self) -> dict[str, Any]:
        # Only teams whose traffic runs on a plugged primary: a degraded team and one the
        # guest already has on its standby have nothing to switch; a kept one stays on it.
        return {"teams": self._switch([t for t in self.teams if t.name not in kept(self.ways)])}

    def _switch(self, teams: list[Team]) -> dict[str, str]:
        """Switch each of *teams* that runs on its plugged primary to its standby."""
        standby_aliases: dict[str, list[str]] = {}  # NICs by MAC, for announce-self
        for interface in self.source.info().interfaces:
            if interface.mac and interface.alias:
                standby_aliases.setdefault(interface.mac, []).append(interface.alias)

        def switch(team: Team) -> str:
            # Owed an undo from the moment it is asked: a switch that timed out may still
            # run in the guest (queued behind a stopped agent), so the undo binds anyway.
            self.moved.append(team.name)
            state = self.source.use_standby(
                team, self.op("switch", team.name), SWITCH_TIMEOUT, release_primary=True
            )
            # At once, for this team's standby only: the switches still send its MAC to the
            # primary's port until they see a frame from the standby, and the bond's own
            # peer notification was seen to come up to 300 ms late.  Only this team's:
            # announcing another team's standby while it is still on its primary would
            # pull that team's traffic away.
            standby = standby_aliases.get(team.standby_mac, [])
            if standby:
                self.source.dom.announce(interfaces=standby)
            return state.active_member

        on_primary = [t for t in teams if t.name in self.on_primary_before]
        return self.source.each_team(on_primary, switch)

    def switch_back(self) -> None:
        """Undo of switch: bind the (still plugged) primary of each team asked to move.

        A recorded primary the live domain no longer has is not waited for: the team
        gets a device of the source's pool instead, as the reconciler would do.
        """
        recorded = self.source.teams()
        teams = [recorded.team(name) for name in reversed(self.moved)]
        self.source.to_primaries(
            [t for t in teams if t.primary is not None],  # None: unplug's undo bound one
            lambda name: self.op("switch-back", name),
            BIND_TIMEOUT,
            lambda m: self.runner.emit("switch", "info", m),
        )
        self.moved.clear()

    def unplug(self) -> dict[str, Any]:
        return {"seconds": self._unplug([t for t in self.teams if t.name not in kept(self.ways)])}

    def _unplug(self, teams: list[Team]) -> dict[str, float]:
        seconds = {}
        recorded = self.source.teams()
        for team in teams:
            if team.name not in self.plugged_before:
                continue  # degraded: nothing to unplug
            current = recorded.team(team.name)
            seconds[team.name] = round(self.source.unplug(current, UNPLUG_TIMEOUT), 3)
            self.unplugged.append(team.name)
        return seconds

    def check_blockers(self) -> dict[str, Any]:
        """With the switched primaries unplugged, QEMU must name no blocker for the kept
        ones to stay plugged; if it still does, they are switched and unplugged too (the
        switch's and unplug's undos cover them)."""
        before = kept(self.ways)
        blockers = self.source.dom.migration_blockers()
        self.ways = still_blocked(self.ways, blockers)
        fallen = [t for t in self.teams if t.name in before and t.name not in kept(self.ways)]
        unplugging = [d for t in fallen if (d := self.classification[t.name].device)]
        stuck = passengers_blocked(self.passengers, blockers, unplugging)
        if stuck:
            raise WorkflowError(stuck)
        if fallen:
            self.runner.emit(
                "state-check", "info", f"{', '.join(t.name for t in fallen)}: switching after all"
            )
            self._switch(fallen)
            self._unplug(fallen)
        kept_now = kept(self.ways)
        copied = [*kept_now, *(f"mdev {u}" for u in self.passengers)]
        detail = f"state copied for {', '.join(copied)}" if copied else "every team switched"
        return {"blockers": blockers, "kept": kept_now, "detail": detail}

    def replug_on_source(self) -> None:
        """Undo of unplug: a device from the source's pool (the one just freed) for every
        unplugged team, plugged in one step and bound in parallel.

        A team left on its standby (no free device, or the bind failed) is an undo that did
        not undo: it fails the compensation, so the outcome says failed, not rolled back.
        """
        recorded = self.source.teams()
        teams = [recorded.team(name) for name in reversed(self.unplugged)]
        results = self.source.plug_and_bind_all(
            teams,
            lambda name: self.op("replug", name),
            BIND_TIMEOUT,
            lambda m: self.runner.emit("unplug", "info", m),
        )
        left = []
        for team in teams:
            result = results[team.name]
            log.info("rollback of team %s: %s", team.name, result.journal())
            if result.result is not TeamMode.PRIMARY:
                left.append(f"{team.name} ({result.detail})")
        self.unplugged.clear()
        if left:
            raise WorkflowError(
                f"team(s) left on their standby: {', '.join(left)}; degraded until a device is free"
            )

    def migrate(self) -> dict[str, Any]:
        src = self.source
        persistent = src.dom.xml(inactive=True)
        keep = kept(self.ways)
        # Every primary ever recorded, including those gone from the live domain only
        # (virsh detach-device-alias leaves the definition): none is the destination's.
        # A kept one is the destination's device instead, in both XMLs.
        for team in [*self.recorded_before, *self.teams]:
            if team.primary is not None and team.name not in keep:
                persistent = strip_primary(persistent, team.primary)
        destination_xml = None
        copied = moves(self.ways, self.classification, self.passengers)
        if copied:
            persistent = retarget_hostdev(persistent, copied, strict=False)
            destination_xml = retarget_hostdev(src.dom.migratable_xml(), copied)

        def progress(p: MigrationProgress) -> None:
            self.runner.emit(
                "migrate",
                "progress",
                f"iteration {p.iteration}, {p.data_remaining >> 20} MiB left",
                p.fraction,
            )

        stop = threading.Event()
        watcher = threading.Thread(
            target=self._abort_on_cancel, args=(stop,), name="migration-cancel", daemon=True
        )
        watcher.start()
        try:
            stats = src.dom.migrate(
                self.destination_hv,
                peer_uri=self.request.peer_uri,
                persistent_xml=persistent,
                unsafe=self.request.unsafe,
                on_progress=progress,
                max_downtime_ms=self.request.max_downtime_ms,
                options=self.request.options,
                destination_xml=destination_xml,
            )
        finally:
            stop.set()
            watcher.join()
        src.close()
        self.destination = self._destination_guest()
        self.migration = dataclasses.replace(stats, wall_s=round(stats.wall_s, 3))
        return {**plain(self.migration), "detail": self.migration.detail}

    def _destination_guest(self) -> Guest:
        """The domain as it arrived on the destination; the lease moved with it."""
        return self.open_guest(self.destination_hv, self.source.uuid, self.source.lease)

    def _step(
        self,
        name: str,
        action: Callable[[], dict[str, Any] | None],
        compensation: Callable[[], None] | None = None,
    ) -> Step:
        """A step whose action and compensation each read the teams' pools once: a pool
        redefined while the workflow runs is seen by the next step, not half-way."""

        def fresh(call: Callable[[], T]) -> Callable[[], T]:
            def run() -> T:
                for guest in (self.source, self.destination):
                    if guest is not None:
                        guest.forget_pools()
                return call()

            return run

        return Step(name, fresh(action), fresh(compensation) if compensation else None)

    def _abort_on_cancel(self, stop: threading.Event) -> None:
        """While the migration call runs: on a cancel, abort its job (again until libvirt
        takes it: the job may not have started yet when the cancel comes)."""
        told = False
        while not stop.wait(CANCEL_POLL_S):
            reason = self._cancel_asked()
            if not reason:
                continue
            if not told:
                self.runner.emit("migrate", "info", f"cancel ({reason}): aborting the job")
                told = True
            try:
                self.source.dom.abort_job()
                return
            except HypervisorError as exc:
                log.info("abort job: %s; again", exc)

    def _cancel_asked(self) -> str:
        if not self.cancel_reason:
            try:
                self.cancel_reason = self.cancelled()
            except Exception as exc:  # the journal unreadable: no cancel, keep going
                log.warning("cannot look for a cancel request: %s", exc)
        return self.cancel_reason

    def _guard(self, next_step: str, ttl: float | None = None) -> None:
        """Between steps before the point of no return: stop on a cancel; keep the lease."""
        reason = self._cancel_asked()
        if reason:
            self.runner.journal.record(self.workflow_id, "cancel", "done", {"by": reason})
            self.runner.emit("cancel", "info", f"{reason}: stopping before {next_step}")
            raise Cancelled(f"cancelled ({reason}) before {next_step}")
        if ttl is None:
            self.source.renew_lease()
        else:
            self.source.renew_lease(ttl)

    def plug_and_bind(self) -> dict[str, Any]:
        """Every switched team's destination device plugged in one step and bound in
        parallel (Guest.plug_and_bind_all); a kept team is only recorded."""
        assert self.destination is not None
        dest = self.destination
        recorded = dest.teams()  # as it arrived; each team's bind changes only its own
        results: dict[str, TeamMode] = {}
        to_plug = []
        for team in self.teams:
            current = recorded.team(team.name)
            way = self.ways.get(team.name)
            if way is not None and way.way is Way.COPY and current.primary is not None:
                # Plugged all along: the record now names the destination's device.
                moved = dataclasses.replace(current.primary, pci_address=way.destination)
                dest.set_primary(team.name, moved)
                results[team.name] = TeamMode.PRIMARY
            else:
                to_plug.append(current)
        bound = dest.plug_and_bind_all(
            to_plug,
            lambda name: self.op("bind", name),
            BIND_TIMEOUT,
            lambda m: self.runner.emit("bind", "info", m),
        )
        self.binds = {name: r.timing for name, r in bound.items() if r.timing is not None}
        results.update({name: r.result for name, r in bound.items()})
        # No announce-self here: QEMU would announce the *virtio* NIC's MAC, which under
        # MAC policy preserve is the team's MAC, pulling the switches' path back to the
        # standby just after the bond moved to the primary.  The bond announces itself
        # (peer notification) when its active member changes.
        return {
            "teams": {t.name: results[t.name] for t in self.teams},
            "binds": {name: r.journal() for name, r in bound.items()},
        }

    def verify(self) -> dict[str, TeamMode]:
        assert self.destination is not None
        info = self.destination.info()
        on_primary = self.destination.teams_on_primary(self.destination.teams(info).teams, info)
        return team_modes(on_primary)

    # -- the whole ---------------------------------------------------------------------

    def run(self) -> MigrationReport:
        try:
            return self._run()
        finally:
            self._close()  # also on an escaping error: the agent channels are one per guest
            self._release_lease()
            # The runner's done steps hold closures over this workflow: a cycle that only
            # the cyclic GC frees, and with it both hosts' libvirt domains, which keep
            # their connections open after close (ptmigd held 2 more per migration: the
            # soak, docs/benchmarks/soak.md).  The workflow is over: nothing is owed.
            self.runner.forget_compensations()

    def _run(self) -> MigrationReport:
        report = MigrationReport(
            self.workflow_id,
            self.request.domain,
            self.request.source_uri,
            self.request.destination_uri,
            Outcome.FAILED,
        )
        r = self.runner
        try:
            r.run(self._step("preflight", self.preflight))
        except Exception as exc:
            report.outcome = Outcome.ROLLED_BACK
            report.error = f"preflight: {exc}"
            report.phases = r.timings
            self._explain(report)
            raise PreflightError(str(exc)) from exc
        try:
            self._guard("switch")
            r.run(self._step("switch", self.switch_to_standby, self.switch_back))
            self._guard("unplug")
            r.run(self._step("unplug", self.unplug, self.replug_on_source))
            if kept(self.ways) or self.passengers:
                self._guard("state-check")
                r.run(self._step("state-check", self.check_blockers))
            self._guard("migrate", JOB_LEASE_TTL)
            r.run(self._step("migrate", self.migrate))
        except PostcopyFailed as exc:
            return self._lost_in_postcopy(report, exc)
        except Exception as exc:
            report.error = str(exc)
            moved = self._domain_moved()
            if moved:
                log.warning("migration reported an error but the VM runs on the destination")
                r.forget_compensations()
                self.source.close()  # the agent's channel: one client at a time
                self.destination = self._destination_guest()
            else:
                errors = r.compensate()
                report.teams = self._team_summary(self.source)
                # Rolled back means the domain is as it was before the workflow, which only
                # the domain and the guest can say: compensations can all succeed and a
                # team still end elsewhere (a request the agent ran late, after its
                # deadline); degraded teams were left alone and stay degraded.
                differences = self._differences_from_before(report.teams)
                report.outcome = Outcome.FAILED if differences else Outcome.ROLLED_BACK
                if self._cancel_asked():
                    report.cancelled = True
                    if not isinstance(exc, Cancelled):  # libvirt's "operation aborted"
                        report.error = f"cancelled ({self.cancel_reason}): {exc}"
                if errors or differences:
                    report.error += "; rollback: " + "; ".join(errors + differences)
                report.phases = r.timings
                self._explain(report)
                return report
        r.forget_compensations()
        if self._cancel_asked():
            self.runner.emit(
                "cancel", "info", f"{self.cancel_reason} came too late: the VM has moved; binding"
            )
        t0 = time.monotonic()
        try:
            assert self.destination is not None
            self.destination.renew_lease()
            r.run(self._step("bind", self.plug_and_bind))
            report.teams = self.verify()
        except Exception as exc:
            log.error("after the migration: %s", exc)
            log.debug("after the migration", exc_info=True)
            report.error = f"after the migration: {exc}"
            report.teams = self._team_summary(self.destination)
        log.debug("post-migration took %.2f s", time.monotonic() - t0)
        report.migration = self.migration
        report.binds = dict(self.binds)
        report.phases = r.timings
        self._explain(report)
        if report.teams and all(v is TeamMode.PRIMARY for v in report.teams.values()):
            report.outcome = Outcome.DONE
        else:
            report.outcome = Outcome.DONE_DEGRADED
        return report

    def _lost_in_postcopy(self, report: MigrationReport, exc: PostcopyFailed) -> MigrationReport:
        """A migration that failed in post-copy has nothing to undo that could be undone:
        the source's memory is stale and libvirt keeps it paused, so plugging a device
        there or asking its agent would only wait on a frozen guest.  Say what is left
        for the operator, in the report and the journal, and stop."""
        self.runner.forget_compensations()
        domain, dest = self.source.name, self.request.destination_uri
        advice = (
            f"the VM ran on the destination and its memory is split between the hosts; "
            f"libvirt keeps it paused on the source (post-copy failed). If the "
            f"destination's QEMU still runs, resume the migration from the source: virsh "
            f"migrate --live --p2p --postcopy --postcopy-resume {domain} {dest}; if it "
            f"died, the VM's state is lost: virsh destroy {domain} on the source and start "
            f"it again. ptmig has not plugged anything back; the primaries stay unplugged "
            f"until the VM runs again and ptmigd --reconcile (or ptmig failover --to "
            f"primary) repairs its teams"
        )
        self.runner.journal.record(
            self.workflow_id, "postcopy", "failed", {"error": str(exc), "advice": advice}
        )
        self.runner.emit("migrate", "info", f"post-copy failed: {advice}")
        report.outcome = Outcome.FAILED
        report.error = f"{exc}; {advice}"
        report.phases = self.runner.timings
        self._explain(report)
        return report

    def _cases(self) -> dict[str, str]:
        return {name: str(d.case) for name, d in self.classification.items()}

    def _ways(self) -> dict[str, str]:
        if not self.hybrid_considered:
            return {}
        return {name: way.line() for name, way in self.ways.items()}

    def _explain(self, report: MigrationReport) -> None:
        """The report's word on each team's case and way, and each passenger's way."""
        report.drift, report.ways = self._cases(), self._ways()
        report.devices = self._devices()

    def _devices(self) -> dict[str, str]:
        return {uuid: way.line() for uuid, way in self.passengers.items()}

    def _differences_from_before(self, teams: dict[str, TeamMode]) -> list[str]:
        """How the source's domain differs from before the workflow, in its teams."""
        if not teams:
            return ["the teams' state could not be read"]
        out = [
            f"team {name} is not back on its primary"
            for name in sorted(self.on_primary_before)
            if teams.get(name) is not TeamMode.PRIMARY
        ]
        try:
            plugged = {d.team.name for d in self.source.classify() if d.device is not None}
        except Exception as exc:
            return [*out, f"the domain's devices could not be read: {exc}"]
        out += [
            f"team {name} has no primary plugged any more"
            for name in sorted(self.plugged_before - plugged)
            if name not in self.on_primary_before
        ]
        return out

    def _domain_moved(self) -> bool:
        """Where the VM really runs after a failed migration call.

        Right after a broken migration connection the destination may still hold the
        incoming (paused) domain until its libvirtd notices: wait for one side to let go.
        """
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            try:
                return self._runs_on_destination_only()
            except WorkflowError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    def _runs_on_destination_only(self) -> bool:
        try:
            src_active = self.source.dom.is_active()
        except HypervisorError:
            src_active = False
        try:
            dest_active = active_on(self.destination_hv, self.source.uuid)
        except HypervisorError:
            dest_active = False
        if src_active and dest_active:
            raise WorkflowError("the VM is active on both hosts; refusing to guess")
        return dest_active and not src_active

    def _team_summary(self, guest: Guest | None) -> dict[str, TeamMode]:
        if guest is None:
            return {}
        try:
            on_primary = guest.teams_on_primary(guest.teams().teams)
            return team_modes(on_primary)
        except Exception as exc:
            log.warning("team summary: %s", exc)
            return {}

    def _close(self) -> None:
        self.source.close()
        if self.destination is not None:
            self.destination.close()

    def _release_lease(self) -> None:
        """Give the lease back on whichever host has the domain now (both, in between)."""
        self.source.release_lease()
        destination = self.destination
        if destination is None:
            try:
                if self.destination_hv.has_domain(self.source.uuid):
                    destination = self._destination_guest()
            except HypervisorError as exc:
                log.warning("lease: %s: %s", self.destination_hv.uri, exc)
        if destination is not None:
            destination.release_lease()
