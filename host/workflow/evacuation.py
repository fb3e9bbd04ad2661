"""Evacuate a host: every running domain with ptmig teams onto other hosts.

    plan      read the source's domains once and each target's pools once; place each
              domain (sorted by name) where all its teams find a free device, counting
              what this evacuation already placed there, on the target with the fewest
              domains placed so far; a domain no target can take whole goes where most
              of its teams fit, else where its teams' pools are defined at all (the
              fewest placed breaking ties) and ends done-degraded, its missing teams on
              their standby until the reconciler finds a device; a team whose pool no
              target defines is refused by the migration's preflight.  A domain's
              mediated devices (carried by QEMU's state copy, no standby) each need a
              free mdev of their pool: a target short of one comes last
    run       at most *parallel* domains at once, each one ``Coordinator.migrate`` in a
              worker thread with its own libvirt connections; a domain that fails does
              not stop the others
    stop      *interrupted* (Ctrl-C, the RPC client gone) is passed to every running
              migration, which cancels as ``ptmig cancel`` does; domains not yet begun
              end not-started

Domains without teams are skipped, or with ``include_untied`` moved by a plain libvirt
migration (no workflow, no journal record: there are no teams to keep).

Locks: the journal's (one SQLite connection, its lock held for one statement or one
write transaction, never across a step), this module's for calling *on_event* (one
event at a time; the results are each worker's own slot), the domain's lease (one
domain).  None is
held across domains, so N workers run N migrations side by side (the coordinator-scale
benchmark, docs/benchmarks/coordinator-scale.md, measures it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from host.domain.domain_xml import parse_domain
from host.errors import Category
from host.hypervisor import Hypervisor, HypervisorError
from host.workflow.errors import PreflightError, WorkflowError
from host.workflow.hybrid import mdev_pools, pool_holding
from host.workflow.inventory import free_by_pool
from host.workflow.journal import WorkflowConflict
from host.workflow.lease import LeaseHeld
from host.workflow.model import (
    DomainEvacuation,
    EvacuationEvent,
    EvacuationOutcome,
    EvacuationReport,
    EvacuationRequest,
    EvacuationTarget,
    Event,
    MigrationReport,
    MigrationRequest,
    capped_parallel,
)

#: How an evacuation runs one domain's migration: ``Coordinator.migrate``.
Migrate = Callable[[MigrationRequest, Callable[[Event], None], Callable[[], str]], MigrationReport]

log = logging.getLogger(__name__)


class NoTarget(WorkflowError):
    """No target host of an evacuation could be reached; nothing was started."""

    category = Category.UNREACHABLE


@dataclass
class Candidate:
    """A running domain of the source, as the plan sees it."""

    name: str
    uuid: str
    pools: tuple[str, ...]  # one entry per team: the pool its primary comes from
    #: One entry per mediated device: its mdev pool here.  Each needs a free mdev of the
    #: pool on the target, or the domain's preflight refuses it (an mdev has no standby).
    carried: tuple[str, ...] = ()


@dataclass
class Placement:
    candidate: Candidate
    target: EvacuationTarget | None  # None: skipped (no teams, not include_untied)
    plain: bool = False  # no teams: a plain libvirt migration
    fits: int = 0  # teams that found a free device on the target when planned


@dataclass
class Plan:
    placements: list[Placement] = field(default_factory=list)
    #: Free devices per target and pool when read (before this evacuation).
    free: dict[str, dict[str, int]] = field(default_factory=dict)


def place(
    candidates: list[Candidate],
    targets: tuple[EvacuationTarget, ...],
    free: dict[str, dict[str, int]],
    include_untied: bool,
) -> list[Placement]:
    """Each domain's target: see the module's docstring (pure, for its unit tests)."""
    left = {t.uri: dict(free.get(t.uri, {})) for t in targets}
    placed = Counter[str]()
    out = []
    for c in sorted(candidates, key=lambda c: (c.name, c.uuid)):
        if not c.pools:
            if not include_untied:
                out.append(Placement(c, None))
                continue
            target = min(targets, key=lambda t: placed[t.uri])
            placed[target.uri] += 1
            out.append(Placement(c, target, plain=True))
            continue
        need = Counter(c.pools)
        carried = Counter(c.carried)

        def fits(t: EvacuationTarget, need: Counter[str] = need) -> int:
            return sum(min(n, left[t.uri].get(pool, 0)) for pool, n in need.items())

        def has_pools(t: EvacuationTarget, need: Counter[str] = need) -> int:
            return sum(n for pool, n in need.items() if pool in left[t.uri])

        def carries(t: EvacuationTarget, carried: Counter[str] = carried) -> bool:
            return all(left[t.uri].get(pool, 0) >= n for pool, n in carried.items())

        # A target that can take every mediated device first (elsewhere the migration is
        # refused), then a whole fit, then the most teams that fit, then the most teams
        # whose pool the target has at all (preflight refuses a destination without the
        # pool); the fewest placed breaks ties and the targets' order those (min keeps
        # the first).
        target = min(
            targets,
            key=lambda t: (
                not carries(t),
                fits(t) < len(c.pools),
                -fits(t),
                -has_pools(t),
                placed[t.uri],
            ),
        )
        fit = fits(target)
        for pool, n in (need + carried).items():
            have = left[target.uri].get(pool, 0)
            left[target.uri][pool] = have - min(n, have)
        placed[target.uri] += 1
        out.append(Placement(c, target, fits=fit))
    return out


class Evacuation:
    """One evacuation run: :meth:`run` returns its report once every domain ended."""

    def __init__(
        self,
        connect: Callable[[str], Hypervisor],
        migrate: Migrate,
        request: EvacuationRequest,
        on_event: Callable[[EvacuationEvent], None],
        interrupted: Callable[[], str],
    ) -> None:
        self.connect = connect
        self.migrate = migrate
        self.request = request
        self.parallel, why = capped_parallel(request.parallel)
        if why:
            log.warning("evacuate %s: %s", request.source_uri, why)
        self._on_event = on_event
        self._interrupted = interrupted
        self._events = threading.Lock()

    # -- plan --------------------------------------------------------------------------

    def plan(self) -> Plan:
        with self.connect(self.request.source_uri) as source:
            here = mdev_pools(source, strict=False)
            candidates = []
            for xml in source.all_domain_xml():
                try:
                    info = parse_domain(xml)
                except Exception as exc:  # a domain ptmig cannot read is not its to move
                    log.warning("evacuate: a domain of %s is unreadable: %s", source.uri, exc)
                    continue
                try:
                    if not source.domain(info.uuid).is_active():
                        continue
                except HypervisorError:
                    continue  # gone since the listing
                teams = info.teams.teams if info.teams else ()
                carried = tuple(
                    pool.name
                    for mdev in info.mdevs
                    if (pool := pool_holding(here, mdev.uuid)) is not None
                )
                pools = tuple(t.pool for t in teams)
                candidates.append(Candidate(info.name, info.uuid, pools, carried))
        free: dict[str, dict[str, int]] = {}
        reachable = []
        for target in self.request.targets:
            try:
                free[target.uri] = self._free_devices(target.uri)
            except HypervisorError as exc:
                log.warning("evacuate: target %s left out: %s", target.uri, exc)
                continue
            reachable.append(target)
        if not reachable:
            raise NoTarget(
                f"evacuate {self.request.source_uri}: no target could be reached "
                f"({', '.join(t.uri for t in self.request.targets)}); nothing was started"
            )
        placements = place(candidates, tuple(reachable), free, self.request.include_untied)
        return Plan(placements, free)

    def _free_devices(self, uri: str) -> dict[str, int]:
        """Free devices per pool on *uri*: what ``ptmig pools`` says, read once."""
        with self.connect(uri) as hv:
            return free_by_pool(hv)

    # -- run ---------------------------------------------------------------------------

    def run(self) -> EvacuationReport:
        started = time.monotonic()
        plan = self.plan()
        results: list[DomainEvacuation | None] = [None] * len(plan.placements)
        work = []
        for index, p in enumerate(plan.placements):
            c = p.candidate
            if p.target is None:
                results[index] = DomainEvacuation(c.name, c.uuid, "", EvacuationOutcome.SKIPPED)
                self._emit(c.name, "", "result", "skipped", EvacuationOutcome.SKIPPED, "no teams")
                continue
            message = (
                "plain libvirt migration (no teams)"
                if p.plain
                else (f"{p.fits} of {len(c.pools)} teams find a free device there")
            )
            self._emit(c.name, p.target.uri, "queued", "info", message=message)
            work.append((index, p))
        with ThreadPoolExecutor(self.parallel, thread_name_prefix="evacuate") as pool:
            futures = [(index, pool.submit(self._one, p)) for index, p in work]
            for index, future in futures:
                results[index] = future.result()
        return EvacuationReport(
            self.request.source_uri,
            self.parallel,
            round(time.monotonic() - started, 6),
            [r for r in results if r is not None],
        )

    def _one(self, placement: Placement) -> DomainEvacuation:
        """One domain to its end; never raises (its failure is its result)."""
        c, target = placement.candidate, placement.target
        assert target is not None
        stopped = self._interrupted()
        if stopped:
            result = DomainEvacuation(
                c.name,
                c.uuid,
                target.uri,
                EvacuationOutcome.NOT_STARTED,
                error=f"not started: the evacuation was stopped ({stopped})",
            )
        else:
            begun, at = time.monotonic(), time.time()
            run = self._plain if placement.plain else self._migrate
            result = run(c, target)
            result.started_at, result.seconds = at, round(time.monotonic() - begun, 6)
        self._emit(c.name, target.uri, "result", str(result.outcome), result.outcome, result.error)
        return result

    def _migrate(self, c: Candidate, target: EvacuationTarget) -> DomainEvacuation:
        request = MigrationRequest(
            c.name,  # as ``ptmig migrate NAME`` reports it; names are unique on a host
            self.request.source_uri,
            target.uri,
            unsafe=self.request.unsafe,
            max_downtime_ms=self.request.max_downtime_ms,
            peer_uri=target.peer_uri,
            options=self.request.options,
        )

        def on_event(event: Event) -> None:
            self._emit(
                c.name,
                target.uri,
                event.phase,
                event.state,
                message=event.message,
                fraction=event.fraction,
                workflow_id=event.workflow_id,
            )

        try:
            report = self.migrate(request, on_event, self._interrupted)
        except (PreflightError, LeaseHeld, WorkflowConflict) as exc:
            return DomainEvacuation(
                c.name, c.uuid, target.uri, EvacuationOutcome.REFUSED, error=str(exc)
            )
        except Exception as exc:
            log.warning("evacuate: %s -> %s failed: %s", c.name, target.uri, exc)
            return DomainEvacuation(
                c.name, c.uuid, target.uri, EvacuationOutcome.FAILED, error=str(exc)
            )
        return DomainEvacuation(
            c.name,
            c.uuid,
            target.uri,
            EvacuationOutcome(str(report.outcome)),
            error=report.error,
            report=report,
        )

    def _plain(self, c: Candidate, target: EvacuationTarget) -> DomainEvacuation:
        """A domain without teams: libvirt's migration alone, persistent at the target."""
        self._emit(c.name, target.uri, "plain", "started")
        try:
            with (
                self.connect(self.request.source_uri) as source,
                self.connect(target.uri) as destination,
            ):
                dom = source.domain(c.uuid)
                dom.migrate(
                    destination,
                    persistent_xml=dom.xml(inactive=True),
                    peer_uri=target.peer_uri,
                    unsafe=self.request.unsafe,
                    max_downtime_ms=self.request.max_downtime_ms,
                    options=self.request.options,
                )
        except Exception as exc:
            self._emit(c.name, target.uri, "plain", "failed", message=str(exc))
            # A failed libvirt migration normally leaves the domain running where it ran:
            # left behind as it was (rolled-back); anything else is for a person to check.
            outcome = (
                EvacuationOutcome.ROLLED_BACK
                if self._runs_on_source_only(c.uuid, target.uri)
                else EvacuationOutcome.FAILED
            )
            return DomainEvacuation(c.name, c.uuid, target.uri, outcome, error=str(exc))
        self._emit(c.name, target.uri, "plain", "done")
        return DomainEvacuation(c.name, c.uuid, target.uri, EvacuationOutcome.MIGRATED_PLAIN)

    def _runs_on_source_only(self, uuid: str, target_uri: str) -> bool:
        try:
            with self.connect(self.request.source_uri) as source:
                here = source.has_domain(uuid) and source.domain(uuid).is_active()
            with self.connect(target_uri) as target:
                there = target.has_domain(uuid) and target.domain(uuid).is_active()
        except HypervisorError:
            return False
        return here and not there

    def _emit(
        self,
        domain: str,
        destination: str,
        phase: str,
        state: str,
        outcome: EvacuationOutcome | None = None,
        message: str = "",
        fraction: float | None = None,
        workflow_id: str = "",
    ) -> None:
        event = EvacuationEvent(
            domain,
            destination,
            phase,
            state,
            "" if outcome is None else str(outcome),
            message,
            fraction,
            workflow_id,
        )
        with self._events:  # the listener sees one event at a time, from any worker
            try:
                self._on_event(event)
            except Exception:
                log.exception("evacuate: the event listener failed")
