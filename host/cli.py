"""``ptmig``: live migration of domains with passthrough NICs, in the style of virsh.

Exit codes:
  0  done: the command did what it says (a migration: every team back on a primary)
  1  error: libvirt, the guest agent or the journal failed; nothing more to say
  2  usage: bad arguments or bad input (nothing was changed)
  3  done-degraded: migrated, but some team stays on its standby (no free device)
  4  refused or rolled back: the VM runs where it ran, as it ran
  5  failed: something could not be undone; the message says what to check
  6  busy: another workflow holds the domain (see 'ptmig workflows'), in this journal
     or by the lease in the domain's metadata (another coordinator's)

'ptmig cancel' exits 0 once the migration is cancelled (rolled back, or asked, with
--wait 0), 1 when there is nothing to cancel or it is too late (the VM has moved), 5
when the cancelled workflow's rollback failed.  Ctrl-C or SIGTERM on 'ptmig migrate'
cancel it the same way; the exit code is then the migration's (4 when rolled back).

'ptmig evacuate' exits with the worst of its domains: 0 when every domain is done,
skipped or migrated-plain; 3 when some are done-degraded and none was left behind; 4
when any was left where it was (rolled-back, refused, not-started); 5 when any failed.
Ctrl-C or SIGTERM stop it starting new migrations and cancel the running ones.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from host.domain.kinds import PoolKind
from host.domain.teams import MAC_POLICIES

if TYPE_CHECKING:
    from host.migration_options import MigrationOptions
    from host.workflow.coordinator import Coordinator
    from host.workflow.model import (
        CancelResult,
        DomainStatus,
        DomainTeams,
        EvacuationEvent,
        EvacuationReport,
        EvacuationRequest,
        Event,
        FailoverResult,
        MigrationReport,
        MigrationRequest,
        PoolStatus,
        RecoverResult,
        WorkflowSummary,
    )

R = TypeVar("R")
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DEGRADED, EXIT_ROLLED_BACK, EXIT_FAILED, EXIT_BUSY = range(7)
DEFAULT_URI = "qemu:///system"


class _Parser(argparse.ArgumentParser):
    """argparse, with its error message on one printable line (it echoes arguments)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(text: str) -> str:
    """`text` with newlines and other unprintable characters escaped, as repr() does."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _bounded_int(low: int, high: int) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}")
        return value

    convert.__name__ = "integer"
    return convert


def _fail(message: object) -> None:
    print(f"ptmig: {_one_line(str(message))}", file=sys.stderr)


#: ``pool-define --kind`` also takes ``vf``, the spelling of ptmig 0.1, for ``vf-network``.
KIND_ALIASES = {"vf": PoolKind.VF_NETWORK.value}


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ptmig",
        description=__doc__.splitlines()[0],
        epilog=__doc__.split("\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-c",
        "--connect",
        default=os.environ.get("LIBVIRT_DEFAULT_URI", DEFAULT_URI),
        metavar="URI",
        help="libvirt URI of the host the domain is on",
    )
    p.add_argument(
        "--journal",
        default=os.environ.get("PTMIG_JOURNAL"),
        help="workflow journal (default /var/lib/ptmig/journal.sqlite)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[..., int], help: str, *, json: bool = True) -> Any:
        parser = sub.add_parser(name, help=help)
        parser.set_defaults(func=run)
        if json:
            parser.add_argument("--json", action="store_true", help="machine-readable output")
        return parser

    ts = command("team-set", team_set, "add or change a team in the domain's metadata")
    ts.add_argument("domain")
    ts.add_argument("--team", required=True, help="the team's name (as the guest agent knows it)")
    ts.add_argument("--standby-mac", required=True, help="MAC of the virtio standby NIC")
    ts.add_argument("--pool", required=True, help="pool the primary comes from on every host")
    ts.add_argument("--mac-policy", choices=MAC_POLICIES, default="preserve")
    ts.add_argument("--team-mac", help="the team's MAC when it is not the standby's")
    ts.add_argument("--primary-alias", help="alias of the primary plugged now (ua-...)")

    tr = command("team-remove", team_remove, "remove a team from the domain's metadata")
    tr.add_argument("domain")
    tr.add_argument("team")

    tshow = command("team-show", team_show, "the domain's teams as recorded in its metadata")
    tshow.add_argument("domain")

    st = command("status", status, "where each team's traffic runs now (asks the agent)")
    st.add_argument("domain")

    pd = command("pool-define", pool_define, "define a device pool on this host")
    pd.add_argument("name")
    pd.add_argument(
        "--kind",
        required=True,
        type=lambda kind: KIND_ALIASES.get(kind, kind),
        choices=[str(k) for k in PoolKind],
        help="vf-network (SR-IOV VFs; 'vf' is accepted too), pci (whole NICs) or emulated",
    )
    pd.add_argument("--bridge", default="", help="emulated: the bridge the NICs join")
    pd.add_argument("--model", default="", help="emulated: NIC model (default e1000e)")
    pd.add_argument(
        "--slot",
        action="append",
        default=[],
        type=_tap_slot,
        metavar="TAP=MAC",
        help="emulated: a NIC slot with its per-host MAC (repeat)",
    )
    pd.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="PCI",
        help="pci: a NIC the host admin gives to guests (repeat)",
    )
    pd.add_argument("--pf", default="", help="vf-network: the SR-IOV physical function's netdev")
    pd.add_argument(
        "--vf",
        action="append",
        default=[],
        metavar="PCI",
        help="vf-network: a VF address (repeat; instead of --pf)",
    )

    pu = command("pool-undefine", pool_undefine, "remove a device pool from this host", json=False)
    pu.add_argument("name")

    command("pools", pools, "this host's pools and their free devices")

    mg = command("migrate", migrate, "live-migrate a domain with its passthrough NICs")
    mg.add_argument("domain")
    mg.add_argument("destination", metavar="DEST_URI")
    mg.add_argument(
        "--peer-uri",
        help="URI the source host uses to reach the destination "
        "(peer-to-peer), when it differs from DEST_URI",
    )
    add_migration_options(mg)

    ev = command(
        "evacuate",
        evacuate,
        "migrate every running domain with teams off a host, onto others",
    )
    ev.description = (
        "Migrate every running domain of SRC_URI that has ptmig teams onto the --to hosts: "
        "each where its teams find free pool devices (counting what this evacuation "
        "placed there), spread by the fewest domains placed; a domain no host can take "
        "whole goes where most of its teams fit (done-degraded).  Domains without teams "
        "are skipped, or moved by a plain libvirt migration with --all.  Exit: 0 every "
        "domain done, skipped or migrated-plain; 3 some done-degraded, none left behind; "
        "4 some left where they were (rolled-back, refused, not-started); 5 some failed."
    )
    ev.add_argument("source", metavar="SRC_URI", help="libvirt URI of the host to empty")
    ev.add_argument(
        "--to",
        action="append",
        required=True,
        metavar="DEST_URI",
        help="a host to move domains to (repeat)",
    )
    ev.add_argument(
        "--peer-uri",
        action="append",
        default=[],
        metavar="URI",
        help="URI the source host uses to reach a destination (peer-to-peer), paired "
        "with --to in order (repeat; fewer than --to: the rest use their DEST_URI)",
    )
    ev.add_argument(
        "--parallel",
        type=_bounded_int(1, 1000),
        default=1,
        metavar="N",
        help="migrations at once (default 1; at most 16: libvirtd's worker threads)",
    )
    ev.add_argument(
        "--all",
        action="store_true",
        dest="include_untied",
        help="also move domains without teams, by a plain libvirt migration",
    )
    add_migration_options(ev)

    fo = command("failover", failover, "move teams to standby or primary without migrating")
    fo.add_argument("domain")
    fo.add_argument("--to", choices=["standby", "primary"], required=True)

    cn = command("cancel", cancel, "stop a domain's running migration (any process, this journal)")
    cn.add_argument("domain")
    cn.add_argument(
        "--wait",
        type=_bounded_int(0, 86_400),
        default=300,
        metavar="S",
        help="seconds to wait for the workflow to have rolled back (0: return at once)",
    )

    command("recover", recover, "finish or roll back workflows a killed coordinator left")

    wf = command("workflows", workflows, "recent workflows from the journal")
    wf.add_argument("--limit", type=_bounded_int(1, 100_000), default=20)
    return p


def add_migration_options(parser: argparse.ArgumentParser) -> None:
    """The libvirt migration options of one migration job, as virsh spells them; every
    command that migrates takes them (``migrate``; ``evacuate`` per domain).  Parsed by
    :func:`migration_options` (and ``--unsafe``/``--max-downtime`` into the request)."""
    parser.add_argument(
        "--unsafe",
        action="store_true",
        help="allow a disk cache mode libvirt calls unsafe (shared image)",
    )
    parser.add_argument(
        "--max-downtime",
        type=_bounded_int(0, 3_600_000),
        metavar="MS",
        help="the longest pause libvirt may take to switch the VM over (migrateSetMaxDowntime), "
        "for the whole job instead of ptmig's budget",
    )
    parser.add_argument(
        "--tls",
        action="store_true",
        help="migration stream over TLS (libvirt's migrate_tls_x509 certificates on both hosts)",
    )
    copy = parser.add_mutually_exclusive_group()
    copy.add_argument(
        "--copy-storage-all",
        dest="copy_storage",
        action="store_const",
        const="all",
        default="",
        help="copy the domain's non-shared disks whole (the destination needs the files)",
    )
    copy.add_argument(
        "--copy-storage-inc",
        dest="copy_storage",
        action="store_const",
        const="inc",
        help="copy what non-shared disks hold beyond a backing image both hosts have",
    )
    parser.add_argument(
        "--migrate-disks",
        type=lambda text: tuple(t for t in text.split(",") if t),
        default=(),
        metavar="TARGETS",
        help="with --copy-storage-*: copy only these disks (vdb,vdc), the others are shared",
    )
    parser.add_argument(
        "--bandwidth", type=_integer, metavar="MiB/s", help="cap the migration's bandwidth"
    )
    parser.add_argument(
        "--auto-converge",
        action="store_true",
        help="throttle the vCPUs of a guest that dirties memory faster than it is sent",
    )
    parser.add_argument(
        "--postcopy",
        action="store_true",
        help="switch to post-copy once the first pre-copy pass has ended",
    )
    parser.add_argument(
        "--postcopy-after",
        type=_number,
        metavar="S",
        help="switch to post-copy after S seconds of pre-copy, or once it stalls "
        "(implies --postcopy)",
    )
    parser.add_argument(
        "--parallel-connections",
        type=_integer,
        metavar="N",
        help="migrate memory over N connections (2..255; not with post-copy)",
    )
    parser.add_argument(
        "--libvirt-defaults",
        action="store_true",
        help="libvirt's downtime limit (300 ms) instead of ptmig's: 50 ms for the first "
        "5 passes, then 300",
    )


def migration_options(args: argparse.Namespace) -> MigrationOptions:
    """The options :func:`add_migration_options` parsed; InvalidMigrationOptions (exit 2,
    nothing changed) for a value out of range or a combination libvirt or QEMU refuse."""
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


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


_integer.__name__ = "integer"
_number.__name__ = "number"


def _tap_slot(spec: str) -> Any:
    from host.domain.errors import DomainModelError
    from host.domain.pools import TapSlot

    tap, sep, mac = spec.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{spec!r}: want TAP=MAC")
    try:
        return TapSlot(tap, mac)
    except DomainModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from host.agent_client import AgentError
    from host.domain.errors import DomainModelError
    from host.hypervisor import HypervisorError
    from host.migration_options import InvalidMigrationOptions
    from host.workflow.guest import PreflightError, WorkflowError
    from host.workflow.journal import JournalError, WorkflowConflict
    from host.workflow.lease import LeaseHeld

    try:
        if hasattr(args, "copy_storage"):  # the command takes add_migration_options
            migration_options(args)  # refused before the journal or libvirt is opened
        return int(args.func(args, _coordinator(args)))
    except (WorkflowConflict, LeaseHeld) as exc:
        _fail(exc)
        return EXIT_BUSY
    except PreflightError as exc:
        _fail(f"refused, nothing changed: {exc}")
        return EXIT_ROLLED_BACK
    except (DomainModelError, InvalidMigrationOptions) as exc:
        _fail(exc)
        return EXIT_USAGE
    except (HypervisorError, WorkflowError, JournalError, AgentError) as exc:
        _fail(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


def _coordinator(args: argparse.Namespace) -> Coordinator:
    from host.workflow.coordinator import Coordinator
    from host.workflow.journal import DEFAULT_PATH, Journal

    return Coordinator(Journal(args.journal or DEFAULT_PATH))


def _show(args: argparse.Namespace, result: object, text: Callable[[], str]) -> None:
    """Print *result* in its one JSON form with ``--json``, else as *text* says."""
    from host.workflow.model import to_json

    print(to_json(result) if getattr(args, "json", False) else text())


# -- the commands: arguments -> one Coordinator call -> what to print and the exit code --


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
    _show(args, teams, lambda: _teams_text(teams))
    return EXIT_OK


def team_remove(args: argparse.Namespace, coordinator: Coordinator) -> int:
    teams = coordinator.team_remove(args.connect, args.domain, args.team)
    _show(args, teams, lambda: _teams_text(teams))
    return EXIT_OK


def team_show(args: argparse.Namespace, coordinator: Coordinator) -> int:
    teams = coordinator.team_show(args.connect, args.domain)
    _show(args, teams, lambda: _teams_text(teams))
    return EXIT_OK


def status(args: argparse.Namespace, coordinator: Coordinator) -> int:
    result = coordinator.status(args.connect, args.domain)
    _show(args, result, lambda: _status_text(result))
    return EXIT_OK


def pool_define(args: argparse.Namespace, coordinator: Coordinator) -> int:
    from host.domain.pools import make_pool

    pool = make_pool(
        args.name,
        args.kind,
        bridge=args.bridge,
        model=args.model,
        slots=args.slot,
        addresses=args.address,
        pf=args.pf,
        vf_addresses=args.vf,
    )
    result = coordinator.pool_define(args.connect, pool)
    _show(args, result, lambda: _pools_text([result]))
    return EXIT_OK


def pool_undefine(args: argparse.Namespace, coordinator: Coordinator) -> int:
    coordinator.pool_undefine(args.connect, args.name)
    return EXIT_OK


def pools(args: argparse.Namespace, coordinator: Coordinator) -> int:
    result = coordinator.pools(args.connect)
    _show(args, result, lambda: _pools_text(result))
    return EXIT_OK


def failover(args: argparse.Namespace, coordinator: Coordinator) -> int:
    from host.workflow.model import TeamMode

    result = coordinator.failover(args.connect, args.domain, TeamMode(args.to))
    _show(args, result, lambda: _failover_text(result))
    return EXIT_OK if all(v == args.to for v in result.teams.values()) else EXIT_DEGRADED


def recover(args: argparse.Namespace, coordinator: Coordinator) -> int:
    from host.workflow.model import Outcome

    results = coordinator.recover()
    _show(args, results, lambda: _recover_text(results))
    return EXIT_FAILED if any(r.outcome is Outcome.FAILED for r in results) else EXIT_OK


def workflows(args: argparse.Namespace, coordinator: Coordinator) -> int:
    rows = coordinator.workflows(args.limit)
    _show(args, rows, lambda: _workflows_text(rows))
    return EXIT_OK


def cancel(args: argparse.Namespace, coordinator: Coordinator) -> int:
    result = coordinator.cancel(args.domain, wait=float(args.wait))
    _show(args, result, lambda: _cancel_text(result))
    if not result.accepted:
        return EXIT_ERROR  # too late: the VM has moved
    if result.ended and not result.cancelled:
        return EXIT_ERROR  # it ended before the cancel took effect
    return EXIT_FAILED if result.ended and str(result.outcome) == "failed" else EXIT_OK


def migrate(args: argparse.Namespace, coordinator: Coordinator) -> int:
    from host.workflow.model import MigrationRequest, Outcome

    request = MigrationRequest(
        args.domain,
        args.connect,
        args.destination,
        unsafe=args.unsafe,
        max_downtime_ms=args.max_downtime,
        peer_uri=args.peer_uri,
        options=migration_options(args),
    )
    interrupt = _Interrupt(request)
    if not args.json and sys.stderr.isatty() and _can_draw_progress():
        report = interrupt.run(lambda: _migrate_with_progress_bars(coordinator, request, interrupt))
    else:

        def on_event(event: Event) -> None:
            interrupt.seen(event)
            if not args.json and event.state != "progress":
                print(f"{event.phase}: {event.state} {event.message}".rstrip(), file=sys.stderr)

        report = interrupt.run(lambda: coordinator.migrate(request, on_event, interrupt.reason))
    _show(args, report, lambda: _report_text(report))
    return {
        Outcome.DONE: EXIT_OK,
        Outcome.DONE_DEGRADED: EXIT_DEGRADED,
        Outcome.ROLLED_BACK: EXIT_ROLLED_BACK,
        Outcome.FAILED: EXIT_FAILED,
    }[report.outcome]


def evacuate(args: argparse.Namespace, coordinator: Coordinator) -> int:
    from host.workflow.model import EvacuationRequest, EvacuationTarget, capped_parallel

    if len(args.peer_uri) > len(args.to):
        _fail("evacuate: more --peer-uri than --to")
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
        _fail(exc)
        return EXIT_USAGE
    _, capped = capped_parallel(request.parallel)
    if capped:
        _fail(capped)
    interrupt = _EvacuationInterrupt(request)
    if not args.json and sys.stderr.isatty() and _can_draw_progress():
        report = interrupt.run(lambda: _evacuate_with_table(coordinator, request, interrupt))
    else:

        def on_event(event: EvacuationEvent) -> None:
            if not args.json and event.state != "progress":
                print(_evacuation_line(event), file=sys.stderr, flush=True)

        report = interrupt.run(lambda: coordinator.evacuate(request, on_event, interrupt.reason))
    _show(args, report, lambda: _evacuation_text(report))
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


class _Interrupt:
    """SIGINT and SIGTERM on ``ptmig migrate`` do what ``ptmig cancel`` does, and say so.

    The migration runs in a worker thread; this (main) thread only waits for it, so the
    signal is handled at once even while libvirt's migration call blocks the worker.
    The first signal asks the workflow to cancel (it aborts the job and rolls back, or,
    once the VM has moved, finishes the bind); later ones only say it is still under
    way: leaving before the workflow ends would leave it open in the journal.
    """

    def __init__(self, request: MigrationRequest) -> None:
        self.request = request
        self._reason = ""
        self._phase = ""
        self._moved = False

    def reason(self) -> str:
        return self._reason

    def seen(self, event: Event) -> None:
        self._phase = event.phase
        if (event.phase, event.state) in (("migrate", "done"), ("bind", "started")):
            self._moved = True

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self._reason:
            print(
                f"ptmig: {name}: already cancelling ({self._reason}); waiting for the workflow "
                "to end so that it is not left open",
                file=sys.stderr,
            )
            return
        self._reason = name
        if self._moved:
            line = (
                f"ptmig: {name}: too late to cancel: {self.request.domain} has moved to "
                f"{self.request.destination_uri}; finishing the bind"
            )
        else:
            line = (
                f"ptmig: {name}: cancelling the migration of {self.request.domain}"
                f"{' at ' + self._phase if self._phase else ''}: aborting and rolling back "
                f"onto {self.request.source_uri}"
            )
        print(line, file=sys.stderr, flush=True)

    def run(self, work: Callable[[], R]) -> R:
        result: list[R] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                result.append(work())
            except BaseException as exc:
                error.append(exc)

        if threading.current_thread() is not threading.main_thread():
            target()  # signals reach the main thread only; an embedding caller's concern
        else:
            previous = {
                s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)
            }
            worker = threading.Thread(target=target, name="migrate")
            try:
                worker.start()
                while worker.is_alive():
                    worker.join(0.2)
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)
        if error:
            raise error[0]
        return result[0]


class _EvacuationInterrupt(_Interrupt):
    """SIGINT and SIGTERM on ``ptmig evacuate``: no new migration starts, the running ones
    are cancelled as ``ptmig cancel`` does (each rolls back, or finishes its bind)."""

    def __init__(self, request: EvacuationRequest) -> None:
        self.evacuation = request
        self._reason = ""

    def _on_signal(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self._reason:
            print(
                f"ptmig: {name}: already stopping ({self._reason}); waiting for the running "
                "migrations to end so that none is left open",
                file=sys.stderr,
            )
            return
        self._reason = name
        print(
            f"ptmig: {name}: stopping the evacuation of {self.evacuation.source_uri}: no new "
            "migration starts; the running ones are cancelled (rolled back, or their bind "
            "finished where the VM has moved)",
            file=sys.stderr,
            flush=True,
        )


def _evacuation_line(event: EvacuationEvent) -> str:
    where = f" -> {event.destination_uri}" if event.destination_uri else ""
    return f"{event.domain}{where}: {event.phase}: {event.state} {event.message}".rstrip()


def _evacuate_with_table(
    coordinator: Coordinator, request: EvacuationRequest, interrupt: _EvacuationInterrupt
) -> Any:
    """A live table, one row per domain (rich, on a terminal)."""
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    rows: dict[str, tuple[str, str, str]] = {}  # domain -> (destination, phase, outcome)

    def table() -> Table:
        t = Table("domain", "destination", "phase", "outcome", title=request.source_uri)
        for domain, (destination, phase, outcome) in rows.items():
            t.add_row(domain, destination, phase, outcome)
        return t

    with Live(table(), console=Console(stderr=True), refresh_per_second=4) as live:

        def on_event(event: EvacuationEvent) -> None:
            destination, phase, outcome = rows.get(event.domain, ("", "", ""))
            if event.outcome:
                outcome = event.outcome
            else:
                phase = f"{event.phase} {event.state}"
                if event.fraction is not None:
                    phase += f" {event.fraction:.0%}"
            rows[event.domain] = (event.destination_uri or destination, phase, outcome)
            live.update(table())

        return coordinator.evacuate(request, on_event, interrupt.reason)


def _can_draw_progress() -> bool:
    """rich draws the bars; a host without it (it is only recommended) gets plain lines."""
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def _migrate_with_progress_bars(
    coordinator: Coordinator, request: MigrationRequest, interrupt: _Interrupt
) -> Any:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description:<10}"),
        BarColumn(),
        TextColumn("{task.fields[message]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    ) as progress:
        tasks: dict[str, Any] = {}

        def on_event(event: Event) -> None:
            interrupt.seen(event)
            task = tasks.get(event.phase)
            if task is None:
                task = tasks[event.phase] = progress.add_task(event.phase, total=1.0, message="")
            if event.state == "done":
                progress.update(task, completed=1.0, message=event.message or "done")
            elif event.fraction is not None:
                progress.update(task, completed=event.fraction, message=event.message)
            else:
                progress.update(task, message=f"{event.state} {event.message}".strip())

        return coordinator.migrate(request, on_event, interrupt.reason)


# -- text renderings -------------------------------------------------------------------


def _teams_text(teams: DomainTeams) -> str:
    lines = []
    for t in teams.teams:
        lines.append(
            f"{t.name}: standby {t.standby_mac}, pool {t.pool}, policy {t.mac_policy}, "
            f"primary {t.primary.alias if t.primary else None}"
        )
        if teams.drift.get(t.name):
            lines.append(f"  drift: {teams.drift[t.name]}")
    return "\n".join(lines) or "no teams"


def _status_text(status: DomainStatus) -> str:
    lines = [f"{status.domain} ({status.uuid})"]
    if status.open_workflow_id:
        lines.append(f"  open workflow {status.open_workflow_id}")
    for team in status.teams:
        primary = team.primary.alias if team.primary else "-"
        lines.append(
            f"  team {team.name}: on {team.mode}, active {team.active_member or '-'}, "
            f"primary {primary}, pool {team.pool}, MAC policy {team.mac_policy}"
        )
        if team.drift:
            lines.append(f"    drift: {team.drift}")
    if status.agent_error:
        lines.append(f"  agent: {status.agent_error}")
    return "\n".join(lines)


def _pools_text(pools: list[PoolStatus]) -> str:
    lines = []
    for p in pools:
        free = "?" if p.free is None else p.free
        error = f" ({p.error})" if p.error else ""
        lines.append(f"{p.name:<16} {p.kind:<14} free {free} of {p.total}{error}")
    return "\n".join(lines) or "no pools"


def _failover_text(result: FailoverResult) -> str:
    return "\n".join(
        f"{team}: {on}" + (f" ({result.why[team]})" if team in result.why else "")
        for team, on in result.teams.items()
    )


def _recover_text(results: list[RecoverResult]) -> str:
    lines = [
        f"{r.workflow_id} {r.domain}: {r.action} {r.detail or r.error}".rstrip() for r in results
    ]
    return "\n".join(lines) or "nothing to recover"


def _workflows_text(rows: list[WorkflowSummary]) -> str:
    lines = [
        f"{r.id} {r.kind:<13} {r.domain_name:<20} {r.state:<6} {r.outcome}".rstrip() for r in rows
    ]
    return "\n".join(lines) or "no workflows"


def _cancel_text(result: CancelResult) -> str:
    return result.message


def _evacuation_text(report: EvacuationReport) -> str:
    lines = [
        f"{d.domain:<20} {d.destination_uri or '-':<28} {d.outcome:<14} {d.seconds:7.2f} s"
        + (f"  {d.error}" if d.error else "")
        for d in report.domains
    ]
    counts: dict[str, int] = {}
    for d in report.domains:
        counts[str(d.outcome)] = counts.get(str(d.outcome), 0) + 1
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "no domains"
    lines.append(
        f"{report.source_uri}: {summary} in {report.wall_s:.1f} s ({report.parallel} at a time)"
    )
    return "\n".join(lines)


def _report_text(report: MigrationReport) -> str:
    cancelled = " (cancelled)" if report.cancelled else ""
    lines = [
        f"{report.domain}: {report.outcome}{cancelled}"
        + (f" ({report.error})" if report.error else "")
    ]
    lines += [f"  {p.name:<10} {p.seconds:7.2f} s  {p.detail}" for p in report.phases]
    for team, on in report.teams.items():
        case = report.drift.get(team, "plugged")
        lines.append(f"  team {team}: on {on}" + ("" if case == "plugged" else f" (was {case})"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
