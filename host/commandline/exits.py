"""``ptmig``'s exit codes (listed in ``ptmig --help``) and its one-line error messages."""

from __future__ import annotations

import sys

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DEGRADED, EXIT_ROLLED_BACK, EXIT_FAILED, EXIT_BUSY = range(7)


def one_line(text: str) -> str:
    """`text` with newlines and other unprintable characters escaped, as repr() does."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(message: object) -> None:
    print(f"ptmig: {one_line(str(message))}", file=sys.stderr)
