"""``ptmig``: live migration of domains with passthrough NICs, in the style of virsh.

Exit codes:
  0  done: the command did what it says (a migration: every team back on a primary)
  1  error: libvirt, the guest agent or the journal failed, or a defect of ptmig
  2  usage: bad arguments or malformed input: URI, name, MAC, address, option
  3  done-degraded: migrated, but some team stays on its standby (no free device)
  4  refused or rolled back: the VM runs where it ran, as it ran
  5  failed: something could not be undone; the message says what to check
  6  busy: another workflow holds the domain (see 'ptmig workflows'), in this journal
     or by the lease in the domain's metadata (another coordinator's)
  7  not found: no such domain, pool, team or workflow (nothing was changed)
  8  unreachable: a host's libvirtd or the guest's agent cannot be reached
  9  timed out: it did not finish within its deadline

Errors are one line on stderr, 'ptmig: <what failed>: <why>[; <what to do>]'; -v adds
the log records.

'ptmig cancel' exits 0 once the migration is cancelled (rolled back, or asked, with
--wait 0), 7 when there is no running migration to cancel, 1 when it is too late (the
VM has moved), 5 when the cancelled workflow's rollback failed.  Ctrl-C or SIGTERM on
'ptmig migrate' cancel it the same way; the exit code is then the migration's (4 when
rolled back).

'ptmig evacuate' exits with the worst of its domains: 0 when every domain is done,
skipped or migrated-plain; 3 when some are done-degraded and none was left behind; 4
when any was left where it was (rolled-back, refused, not-started); 5 when any failed.
Ctrl-C or SIGTERM stop it starting new migrations and cancel the running ones.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from host.commandline import parser
from host.commandline.commands import migration_options
from host.commandline.exits import (
    EXIT_BUSY,
    EXIT_DEGRADED,
    EXIT_ERROR,
    EXIT_FAILED,
    EXIT_FOR,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_ROLLED_BACK,
    EXIT_TIMED_OUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    fail_with,
)

if TYPE_CHECKING:
    from host.workflow.coordinator import Coordinator

__all__ = [
    "EXIT_BUSY",
    "EXIT_DEGRADED",
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_FOR",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_ROLLED_BACK",
    "EXIT_TIMED_OUT",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "build_parser",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    """``ptmig``'s parser (also read by scripts/manpages.py), described by this docstring."""
    return parser.build_parser(__doc__ or "")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(
            level=logging.DEBUG, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
        )
    else:  # a person reads one error line; the log records are for -v
        logging.basicConfig(handlers=[logging.NullHandler()], level=logging.CRITICAL)
    from host.workflow.errors import PreflightError

    what = _subject(args)
    try:
        if hasattr(args, "copy_storage"):  # the command takes add_migration_options
            migration_options(args)  # refused before the journal or libvirt is opened
        return int(args.func(args, _coordinator(args)))
    except PreflightError as exc:
        return fail_with(f"{what}: refused, nothing changed", exc)
    except KeyboardInterrupt:
        return EXIT_ERROR
    except Exception as exc:  # a PtmigError by its category; anything else is a defect
        logging.getLogger("ptmig").debug("%s failed", what, exc_info=exc)  # shown with -v
        return fail_with(what, exc)


def _subject(args: argparse.Namespace) -> str:
    """What the command acts on, for its error line: ``migrate vm1``, ``pool-define p``."""
    named = getattr(args, "domain", None) or getattr(args, "name", None)
    if args.command == "evacuate":
        named = getattr(args, "source", None)
    return f"{args.command} {named}" if named else str(args.command)


def _coordinator(args: argparse.Namespace) -> Coordinator:
    from host.workflow.coordinator import Coordinator
    from host.workflow.journal import DEFAULT_PATH, Journal

    return Coordinator(Journal(args.journal or DEFAULT_PATH))


if __name__ == "__main__":
    sys.exit(main())
