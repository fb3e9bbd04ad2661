"""``ptmig``'s argument parser: one sub-command per Coordinator method, each calling its
function of :mod:`host.commandline.commands`."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from host.commandline.commands import (
    cancel,
    evacuate,
    failover,
    migrate,
    pool_define,
    pool_undefine,
    pools,
    recover,
    status,
    team_remove,
    team_set,
    team_show,
    workflows,
)
from host.commandline.exits import EXIT_USAGE, one_line
from host.domain.kinds import PoolKind
from host.domain.teams import MAC_POLICIES

if TYPE_CHECKING:
    pass

DEFAULT_URI = "qemu:///system"


class _Parser(argparse.ArgumentParser):
    """argparse, with its error as ptmig's one printable line (it echoes arguments), the
    usage left to ``--help``."""

    def error(self, message: str) -> NoReturn:
        what = self.prog.removeprefix("ptmig").strip() or "usage"
        self.exit(EXIT_USAGE, f"ptmig: {what}: {one_line(message)}; see '{self.prog} --help'\n")


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


#: ``pool-define --kind`` also takes ``vf``, the spelling of ptmig 0.1, for ``vf-network``.
KIND_ALIASES = {"vf": PoolKind.VF_NETWORK.value}


def build_parser(doc: str) -> argparse.ArgumentParser:
    """The parser, its description and epilog from *doc* (host/cli.py's docstring)."""
    p = _Parser(
        prog="ptmig",
        description=doc.splitlines()[0],
        epilog=doc.split("\n", 1)[1],
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
        help="vf-network (SR-IOV VFs; 'vf' is accepted too), pci (whole NICs), emulated, "
        "or mdev (mediated devices, carried by a state copy)",
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
    pd.add_argument(
        "--mdev-type",
        default="",
        metavar="TYPE",
        help="mdev: the mediated devices' type, as sysfs names it (mtty-2); the same on "
        "every host's pool of this name",
    )
    pd.add_argument(
        "--uuid",
        action="append",
        default=[],
        metavar="UUID",
        help="mdev: a mediated device made on this host (repeat)",
    )
    pd.add_argument(
        "--state-copy",
        action="store_true",
        help="pci, mdev: these devices' drivers implement VFIO migration; a team's NIC (or a "
        "domain's mdev) stays plugged while QEMU copies its state, when the destination's "
        "pool says so too",
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
    mg.add_argument(
        "--switch-all",
        action="store_true",
        help="switch and unplug every team's primary, even one whose state QEMU could copy "
        "(a pci pool marked --state-copy on both hosts)",
    )
    mg.add_argument(
        "--switch",
        action="append",
        default=[],
        metavar="TEAM",
        type=_team_name,
        help="switch and unplug this team's primary even if its state could be copied "
        "(repeat; beside --switch-all, which does it for every team)",
    )

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
    command that migrates takes them (``migrate``; ``evacuate`` per domain).  Read by
    ``commands.migration_options`` (and ``--unsafe``/``--max-downtime`` into the
    request)."""
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


def _team_name(name: str) -> str:
    from host.domain.errors import DomainModelError
    from host.domain.names import check_name

    try:
        return check_name(name, "--switch")
    except DomainModelError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
