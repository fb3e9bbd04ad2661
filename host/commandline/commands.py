"""``ptmig``'s commands: arguments -> one Coordinator call -> what to print and the exit
code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from host.commandline import render
from host.commandline.exits import (
    EXIT_DEGRADED,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_ROLLED_BACK,
    EXIT_USAGE,
    fail,
)
from host.commandline.live import (
    EvacuationInterrupt,
    MigrationInterrupt,
    can_draw_progress,
    evacuate_with_table,
    evacuation_line,
    migrate_with_progress_bars,
)

if TYPE_CHECKING:
    from host.domain.pools import Pool
    from host.migration_options import MigrationOptions
    from host.workflow.coordinator import Coordinator
    from host.workflow.model import (
        EvacuationEvent,
        EvacuationReport,
        Event,
        MigrationRequest,
    )


def migration_options(args: argparse.Namespace) -> MigrationOptions:
    """The options ``add_migration_options`` (the parser) parsed; InvalidMigrationOptions
    (exit 2, nothing changed) for a value out of range or a combination libvirt or QEMU
    refuse."""
    from host.migration_options import CopyStorage, MigrationOptions

    return MigrationOptions(
        tls=args.tls,
        copy_storage=CopyStorage(args.copy_storage),
        migrate_disks=args.migrate_disks,
        bandwidth_mib_s=args.bandwidth,
        auto_converge=args.auto_converge,
        postcopy=args.postcopy or args.postcopy_after is not None,
        postcopy_after_s=args.postcopy_after,
        parallel_connections=args.parallel_connections,
        libvirt_defaults=args.libvirt_defaults,
    )


def migration_request(args: argparse.Namespace) -> MigrationRequest:
    """``ptmig migrate``'s request, as ptmigd's ``encode.migration_request`` builds it from
    a MigrateRequest (the two faces agree: tests/unit/host/test_hybrid.py)."""
    from host.workflow.model import MigrationRequest

    return MigrationRequest(
        args.domain,
        args.connect,
        args.destination,
        unsafe=args.unsafe,
        max_downtime_ms=args.max_downtime,
        peer_uri=args.peer_uri,
        options=migration_options(args),
        switch_all=args.switch_all,
        switch_teams=tuple(dict.fromkeys(args.switch)),
    )


def show(args: argparse.Namespace, result: object, text: Callable[[], str]) -> None:
    """Print *result* in its one JSON form with ``--json``, else as *text* says."""
    from host.workflow.model import to_json

    print(to_json(result) if getattr(args, "json", False) else text())


def team_set(args: argparse.Namespace, coordinator: Coordinator) -> int:
    from host.workflow.model import TeamRequest

    request = TeamRequest(
        name=args.team,
        standby_mac=args.standby_mac,
        pool=args.pool,
        mac_policy=args.mac_policy,
        team_mac=args.team_mac,
        primary_alias=args.primary_alias,
    )
    teams = coordinator.team_set(args.connect, args.domain, request)
    show(args, teams, lambda: render.teams_text(teams))
    return EXIT_OK


def team_remove(args: argparse.Namespace, coordinator: Coordinator) -> int:
    teams = coordinator.team_remove(args.connect, args.domain, args.team)
    show(args, teams, lambda: render.teams_text(teams))
    return EXIT_OK


def team_show(args: argparse.Namespace, coordinator: Coordinator) -> int:
    teams = coordinator.team_show(args.connect, args.domain)
    show(args, teams, lambda: render.teams_text(teams))
    return EXIT_OK


def status(args: argparse.Namespace, coordinator: Coordinator) -> int:
    result = coordinator.status(args.connect, args.domain)
    show(args, result, lambda: render.status_text(result))
    return EXIT_OK


def pool_definition(args: argparse.Namespace) -> Pool:
    """``ptmig pool-define``'s pool, as ptmigd's ``encode.pool_definition`` builds it from a
    DefinePoolRequest."""
    from host.domain.pools import make_pool

    return make_pool(
        args.name,
        args.kind,
        bridge=args.bridge,
        model=args.model,
        slots=args.slot,
        addresses=args.address,
        pf=args.pf,
        vf_addresses=args.vf,
        state_copy=args.state_copy,
        mdev_type=args.mdev_type,
        mdev_uuids=args.uuid,
    )


def pool_define(args: argparse.Namespace, coordinator: Coordinator) -> int:
    pool = pool_definition(args)
    result = coordinator.pool_define(args.connect, pool)
    show(args, result, lambda: render.pools_text([result]))
    return EXIT_OK


def pool_undefine(args: argparse.Namespace, coordinator: Coordinator) -> int:
    coordinator.pool_undefine(args.connect, args.name)
    return EXIT_OK


def pools(args: argparse.Namespace, coordinator: Coordinator) -> int:
    result = coordinator.pools(args.connect)
    show(args, result, lambda: render.pools_text(result))
    return EXIT_OK


def failover(args: argparse.Namespace, coordinator: Coordinator) -> int:
    from host.workflow.model import TeamMode

    result = coordinator.failover(args.connect, args.domain, TeamMode(args.to))
    show(args, result, lambda: render.failover_text(result))
    return EXIT_OK if all(v == args.to for v in result.teams.values()) else EXIT_DEGRADED


def recover(args: argparse.Namespace, coordinator: Coordinator) -> int:
    from host.workflow.model import Outcome

    results = coordinator.recover()
    show(args, results, lambda: render.recover_text(results))
    return EXIT_FAILED if any(r.outcome is Outcome.FAILED for r in results) else EXIT_OK


def workflows(args: argparse.Namespace, coordinator: Coordinator) -> int:
    rows = coordinator.workflows(args.limit)
    show(args, rows, lambda: render.workflows_text(rows))
    return EXIT_OK


def cancel(args: argparse.Namespace, coordinator: Coordinator) -> int:
    result = coordinator.cancel(args.domain, wait=float(args.wait))
    show(args, result, lambda: render.cancel_text(result))
    if not result.accepted:
        return EXIT_ERROR  # too late: the VM has moved
    if result.ended and not result.cancelled:
        return EXIT_ERROR  # it ended before the cancel took effect
    return EXIT_FAILED if result.ended and str(result.outcome) == "failed" else EXIT_OK


def migrate(args: argparse.Namespace, coordinator: Coordinator) -> int:
    from host.workflow.model import Outcome

    request = migration_request(args)
    interrupt = MigrationInterrupt(request)
    if not args.json and sys.stderr.isatty() and can_draw_progress():
        report = interrupt.run(lambda: migrate_with_progress_bars(coordinator, request, interrupt))
    else:

        def on_event(event: Event) -> None:
            interrupt.seen(event)
            if not args.json and event.state != "progress":
                print(f"{event.phase}: {event.state} {event.message}".rstrip(), file=sys.stderr)

        report = interrupt.run(lambda: coordinator.migrate(request, on_event, interrupt.reason))
    show(args, report, lambda: render.report_text(report))
    return {
        Outcome.DONE: EXIT_OK,
        Outcome.DONE_DEGRADED: EXIT_DEGRADED,
        Outcome.ROLLED_BACK: EXIT_ROLLED_BACK,
        Outcome.FAILED: EXIT_FAILED,
    }[report.outcome]


def evacuate(args: argparse.Namespace, coordinator: Coordinator) -> int:
    from host.workflow.model import EvacuationRequest, EvacuationTarget, capped_parallel

    if len(args.peer_uri) > len(args.to):
        fail("evacuate: more --peer-uri than --to")
        return EXIT_USAGE
    peers = args.peer_uri + [None] * (len(args.to) - len(args.peer_uri))
    try:
        request = EvacuationRequest(
            args.source,
            tuple(EvacuationTarget(uri, peer) for uri, peer in zip(args.to, peers, strict=True)),
            parallel=args.parallel,
            include_untied=args.include_untied,
            unsafe=args.unsafe,
            max_downtime_ms=args.max_downtime,
            options=migration_options(args),
        )
    except ValueError as exc:
        fail(exc)
        return EXIT_USAGE
    _, capped = capped_parallel(request.parallel)
    if capped:
        fail(capped)
    interrupt = EvacuationInterrupt(request)
    if not args.json and sys.stderr.isatty() and can_draw_progress():
        report = interrupt.run(lambda: evacuate_with_table(coordinator, request, interrupt))
    else:

        def on_event(event: EvacuationEvent) -> None:
            if not args.json and event.state != "progress":
                print(evacuation_line(event), file=sys.stderr, flush=True)

        report = interrupt.run(lambda: coordinator.evacuate(request, on_event, interrupt.reason))
    show(args, report, lambda: render.evacuation_text(report))
    return evacuation_exit_code(report)


def evacuation_exit_code(report: EvacuationReport) -> int:
    """The worst of the domains' outcomes (see ``ptmig evacuate --help``)."""
    from host.workflow.model import EvacuationOutcome as O

    outcomes = {d.outcome for d in report.domains}
    if O.FAILED in outcomes:
        return EXIT_FAILED
    if outcomes & {O.ROLLED_BACK, O.REFUSED, O.NOT_STARTED}:
        return EXIT_ROLLED_BACK
    if O.DONE_DEGRADED in outcomes:
        return EXIT_DEGRADED
    return EXIT_OK
