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
    EXIT_OK,
    EXIT_ROLLED_BACK,
    EXIT_USAGE,
    fail,
)
from host.errors import PtmigError

if TYPE_CHECKING:
    from host.workflow.coordinator import Coordinator

__all__ = [
    "EXIT_BUSY",
    "EXIT_DEGRADED",
    "EXIT_ERROR",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_ROLLED_BACK",
    "EXIT_USAGE",
    "build_parser",
    "main",
]


def build_parser() -> argparse.ArgumentParser:
    """``ptmig``'s parser (also read by scripts/manpages.py), described by this docstring."""
    return parser.build_parser(__doc__ or "")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from host.domain.errors import DomainModelError
    from host.migration_options import InvalidMigrationOptions
    from host.workflow.errors import PreflightError
    from host.workflow.journal import WorkflowConflict
    from host.workflow.lease import LeaseHeld

    try:
        if hasattr(args, "copy_storage"):  # the command takes add_migration_options
            migration_options(args)  # refused before the journal or libvirt is opened
        return int(args.func(args, _coordinator(args)))
    except (WorkflowConflict, LeaseHeld) as exc:
        fail(exc)
        return EXIT_BUSY
    except PreflightError as exc:
        fail(f"refused, nothing changed: {exc}")
        return EXIT_ROLLED_BACK
    except (DomainModelError, InvalidMigrationOptions) as exc:
        fail(exc)
        return EXIT_USAGE
    except PtmigError as exc:  # libvirt, the agent, the journal, the workflow
        fail(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_ERROR


def _coordinator(args: argparse.Namespace) -> Coordinator:
    from host.workflow.coordinator import Coordinator
    from host.workflow.journal import DEFAULT_PATH, Journal

    return Coordinator(Journal(args.journal or DEFAULT_PATH))


if __name__ == "__main__":
    sys.exit(main())
