"""``ptmig``: live migration of domains with passthrough NICs, in the style of virsh.

Exit codes:
  0  done: the command did what it says (a migration: every team back on a primary)
  1  error: libvirt, the guest agent or the journal failed; nothing more to say
  2  usage: bad arguments or bad input (nothing was changed)
  3  done-degraded: migrated, but some team stays on its standby (no free device)
  4  refused or rolled back: the VM runs where it ran, as it ran
  5  failed: something could not be undone; the message says what to check
  6  busy: another workflow holds the domain (see 'ptmig workflows')
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

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


def _parser() -> argparse.ArgumentParser:
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

    ts = sub.add_parser("team-set", help="add or change a team in the domain's metadata")
    ts.add_argument("domain")
    ts.add_argument("--team", required=True, help="the team's name (as the guest agent knows it)")
    ts.add_argument("--standby-mac", required=True, help="MAC of the virtio standby NIC")
    ts.add_argument("--pool", required=True, help="pool the primary comes from on every host")
    ts.add_argument("--mac-policy", choices=["preserve", "follow", "none"], default="preserve")
    ts.add_argument("--team-mac", help="the team's MAC when it is not the standby's")
    ts.add_argument("--primary-alias", help="alias of the primary plugged now (ua-...)")

    tr = sub.add_parser("team-remove", help="remove a team from the domain's metadata")
    tr.add_argument("domain")
    tr.add_argument("team")

    tshow = sub.add_parser("team-show", help="the domain's teams as recorded in its metadata")
    tshow.add_argument("domain")
    tshow.add_argument("--json", action="store_true")

    st = sub.add_parser("status", help="where each team's traffic runs now (asks the agent)")
    st.add_argument("domain")
    st.add_argument("--json", action="store_true")

    pd = sub.add_parser("pool-define", help="define a device pool on this host")
    pd.add_argument("name")
    pd.add_argument("--kind", choices=["emulated", "pci", "vf"], required=True)
    pd.add_argument("--bridge", help="emulated: the bridge the NICs join")
    pd.add_argument("--model", default="e1000e", help="emulated: NIC model")
    pd.add_argument(
        "--slot",
        action="append",
        default=[],
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
    pd.add_argument("--pf", help="vf: the SR-IOV physical function's netdev")
    pd.add_argument(
        "--vf",
        action="append",
        default=[],
        metavar="PCI",
        help="vf: a VF address (repeat; instead of --pf)",
    )

    pu = sub.add_parser("pool-undefine", help="remove a device pool from this host")
    pu.add_argument("name")

    pl = sub.add_parser("pools", help="this host's pools and their free devices")
    pl.add_argument("--json", action="store_true")

    mg = sub.add_parser("migrate", help="live-migrate a domain with its passthrough NICs")
    mg.add_argument("domain")
    mg.add_argument("destination", metavar="DEST_URI")
    mg.add_argument(
        "--peer-uri",
        help="URI the source host uses to reach the destination "
        "(peer-to-peer), when it differs from DEST_URI",
    )
    mg.add_argument(
        "--unsafe",
        action="store_true",
        help="allow a disk cache mode libvirt calls unsafe (shared image)",
    )
    mg.add_argument("--max-downtime", type=_bounded_int(0, 3_600_000), metavar="MS")
    mg.add_argument("--json", action="store_true", help="machine-readable report, no display")

    fo = sub.add_parser("failover", help="move teams to standby or primary without migrating")
    fo.add_argument("domain")
    fo.add_argument("--to", choices=["standby", "primary"], required=True)
    fo.add_argument("--json", action="store_true")

    rc = sub.add_parser("recover", help="finish or roll back workflows a killed coordinator left")
    rc.add_argument("--json", action="store_true")

    wf = sub.add_parser("workflows", help="recent workflows from the journal")
    wf.add_argument("--json", action="store_true")
    wf.add_argument("--limit", type=_bounded_int(1, 100_000), default=20)
    return p


def _print(data: Any, as_json: bool, text: Callable[[Any], str]) -> None:
    from host.workflow.model import to_json

    print(to_json(data) if as_json else text(data))


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from host.agent_client import AgentError
    from host.domain.errors import DomainModelError
    from host.hypervisor import HypervisorError
    from host.workflow.guest import PreflightError, WorkflowError
    from host.workflow.journal import JournalError, WorkflowConflict

    try:
        return _run(args)
    except WorkflowConflict as exc:
        _fail(exc)
        return EXIT_BUSY
    except PreflightError as exc:
        _fail(f"refused, nothing changed: {exc}")
        return EXIT_ROLLED_BACK
    except DomainModelError as exc:
        _fail(exc)
        return EXIT_USAGE
    except (HypervisorError, WorkflowError, JournalError, AgentError) as exc:
        _fail(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


def _coordinator(args: argparse.Namespace) -> Any:
    from host.workflow.coordinator import Coordinator
    from host.workflow.journal import DEFAULT_PATH, Journal

    return Coordinator(Journal(args.journal or DEFAULT_PATH))


def _run(args: argparse.Namespace) -> int:
    cmd = args.command
    if cmd in ("team-set", "team-remove", "team-show"):
        return _teams(args)
    if cmd in ("pool-define", "pool-undefine"):
        return _pool_define(args)
    if cmd == "pools":
        pools = _coordinator(args).pools(args.connect)
        _print(
            pools,
            args.json,
            lambda ps: (
                "\n".join(
                    f"{p.name:<16} {p.kind:<14} "
                    f"free {'?' if p.free is None else p.free} of {p.total}"
                    f"{' (' + p.error + ')' if p.error else ''}"
                    for p in ps
                )
                or "no pools"
            ),
        )
        return EXIT_OK
    if cmd == "status":
        status = _coordinator(args).status(args.connect, args.domain)
        _print(status, args.json, _status_text)
        return EXIT_OK
    if cmd == "migrate":
        return _migrate(args)
    if cmd == "failover":
        from host.workflow.model import TeamMode

        result = _coordinator(args).failover(args.connect, args.domain, TeamMode(args.to))
        _print(result, args.json, lambda r: "\n".join(f"{k}: {v}" for k, v in r.teams.items()))
        return EXIT_OK if all(v == args.to for v in result.teams.values()) else EXIT_DEGRADED
    if cmd == "recover":
        results = _coordinator(args).recover()
        _print(
            results,
            args.json,
            lambda rs: (
                "\n".join(
                    f"{r.workflow_id} {r.domain}: {r.action} {r.detail or r.error}".rstrip()
                    for r in rs
                )
                or "nothing to recover"
            ),
        )
        failed = any(r.action == "failed" for r in results)
        return EXIT_FAILED if failed else EXIT_OK
    if cmd == "workflows":
        rows = _coordinator(args).workflows(args.limit)
        _print(
            rows,
            args.json,
            lambda rs: (
                "\n".join(
                    f"{r.id} {r.kind:<8} {r.domain_name:<20} {r.state:<6} {r.outcome}".rstrip()
                    for r in rs
                )
                or "no workflows"
            ),
        )
        return EXIT_OK
    raise AssertionError(cmd)


def _status_text(status: Any) -> str:
    lines = [f"{status.domain} ({status.uuid})"]
    if status.open_workflow_id:
        lines.append(f"  open workflow {status.open_workflow_id}")
    for team in status.teams:
        primary = team.primary.alias if team.primary else "-"
        lines.append(
            f"  team {team.name}: on {team.mode}, active {team.active_member or '-'}, "
            f"primary {primary}, pool {team.pool}, MAC policy {team.mac_policy}"
        )
    if status.agent_error:
        lines.append(f"  agent: {status.agent_error}")
    return "\n".join(lines)


def _teams(args: argparse.Namespace) -> int:
    from host.domain.domain_xml import Hostdev, parse_domain
    from host.domain.teams import PrimaryDevice, Team, TeamSet
    from host.hypervisor import Hypervisor
    from host.workflow.guest import GuestOnHost

    with Hypervisor(args.connect) as hv:
        guest = GuestOnHost(hv, args.domain)
        info = parse_domain(hv.domain_xml(guest.dom))
        teams = info.teams or TeamSet(())
        if args.command == "team-show":
            data = [_team_dict(t) for t in teams.teams]
            _print(
                data,
                args.json,
                lambda ts: (
                    "\n".join(
                        f"{t['name']}: standby {t['standby_mac']}, pool {t['pool']}, "
                        f"policy {t['mac_policy']}, "
                        f"primary {t['primary'] and t['primary']['alias']}"
                        for t in ts
                    )
                    or "no teams"
                ),
            )
            return EXIT_OK
        if args.command == "team-remove":
            remaining = TeamSet(tuple(t for t in teams.teams if t.name != args.team))
            if len(remaining.teams) == len(teams.teams):
                _fail(f"{guest.name} has no team {args.team!r}")
                return EXIT_USAGE
            guest.save_teams(remaining)
            return EXIT_OK
        primary = None
        if args.primary_alias:
            device = info.device(args.primary_alias)
            if device is None:
                _fail(f"{guest.name} has no device with alias {args.primary_alias!r}")
                return EXIT_USAGE
            if isinstance(device, Hostdev):
                primary = PrimaryDevice(
                    "pci", args.primary_alias, pci_address=device.host_pci_address
                )
            elif device.type in ("network", "hostdev") and device.network:
                primary = PrimaryDevice(
                    "vf-network", args.primary_alias, mac=device.mac, network=device.network
                )
            else:
                primary = PrimaryDevice(
                    "emulated", args.primary_alias, mac=device.mac, tap=device.target_dev
                )
        team = Team(
            args.team,
            args.standby_mac,
            args.mac_policy,
            args.pool,
            team_mac=args.team_mac,
            primary=primary,
        )
        guest.save_teams(teams.with_team(team))
        return EXIT_OK


def _team_dict(team: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(team)


def _pool_define(args: argparse.Namespace) -> int:
    from host.domain.pools import (
        EmulatedPool,
        PciPool,
        TapSlot,
        VfNetworkPool,
        format_pool_network,
        pool_network_name,
    )
    from host.hypervisor import Hypervisor

    with Hypervisor(args.connect) as hv:
        if args.command == "pool-undefine":
            hv.undefine_network(pool_network_name(args.name))
            return EXIT_OK
        pool: Any
        if args.kind == "emulated":
            if not args.bridge:
                _fail("an emulated pool needs --bridge")
                return EXIT_USAGE
            slots = []
            for spec in args.slot:
                tap, sep, mac = spec.partition("=")
                if not sep:
                    _fail(f"--slot {spec!r}: want TAP=MAC")
                    return EXIT_USAGE
                slots.append(TapSlot(tap, mac))
            pool = EmulatedPool(args.name, args.bridge, args.model, tuple(slots))
        elif args.kind == "pci":
            pool = PciPool(args.name, tuple(args.address))
        else:
            pool = VfNetworkPool(args.name, pf_dev=args.pf, vf_addresses=tuple(args.vf))
        hv.define_network(format_pool_network(pool), start=args.kind == "vf")
    return EXIT_OK


def _migrate(args: argparse.Namespace) -> int:
    from host.workflow.model import Event, MigrationRequest, Outcome, to_json

    request = MigrationRequest(
        args.domain,
        args.connect,
        args.destination,
        unsafe=args.unsafe,
        max_downtime_ms=args.max_downtime,
        peer_uri=args.peer_uri,
    )
    coordinator = _coordinator(args)
    show = not args.json and sys.stderr.isatty()
    if show:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        with Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            TextColumn("{task.fields[message]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        ) as progress:
            tasks: dict[str, Any] = {}

            def on_event(event: Event) -> None:
                task = tasks.get(event.phase)
                if task is None:
                    task = tasks[event.phase] = progress.add_task(
                        event.phase, total=1.0, message=""
                    )
                if event.state == "done":
                    progress.update(task, completed=1.0, message=event.message or "done")
                elif event.fraction is not None:
                    progress.update(task, completed=event.fraction, message=event.message)
                else:
                    progress.update(task, message=f"{event.state} {event.message}".strip())

            report = coordinator.migrate(request, on_event)
    else:

        def on_event(event: Event) -> None:
            if not args.json and event.state != "progress":
                print(f"{event.phase}: {event.state} {event.message}".rstrip(), file=sys.stderr)

        report = coordinator.migrate(request, on_event)
    if args.json:
        print(to_json(report))
    else:
        print(f"{report.domain}: {report.outcome}" + (f" ({report.error})" if report.error else ""))
        for phase in report.phases:
            print(f"  {phase.name:<10} {phase.seconds:7.2f} s  {phase.detail}")
        for team, on in report.teams.items():
            print(f"  team {team}: on {on}")
    return {
        Outcome.DONE: EXIT_OK,
        Outcome.DONE_DEGRADED: EXIT_DEGRADED,
        Outcome.ROLLED_BACK: EXIT_ROLLED_BACK,
        Outcome.FAILED: EXIT_FAILED,
    }[report.outcome]


if __name__ == "__main__":
    sys.exit(main())
