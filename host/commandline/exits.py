"""``ptmig``'s exit codes (listed in ``ptmig --help``) and its one-line error messages.

An error exits with its category's code (:data:`EXIT_FOR`, the one table of it; the
operator guide lists it beside ptmigd's gRPC status of the same category); a workflow
that ran exits with its outcome's (done, done-degraded, rolled back, failed)."""

from __future__ import annotations

import sys

from host.errors import Category, PtmigError, category_of

(
    EXIT_OK,
    EXIT_ERROR,
    EXIT_USAGE,
    EXIT_DEGRADED,
    EXIT_ROLLED_BACK,
    EXIT_FAILED,
    EXIT_BUSY,
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    EXIT_TIMED_OUT,
) = range(10)

#: The exit code of each category.  2, 4 and 6 kept the meaning they had (bad input,
#: refused with nothing changed, another workflow holds the domain); 7, 8 and 9 split
#: not-found, unreachable and timed-out off 1 and 2.
EXIT_FOR: dict[Category, int] = {
    Category.INVALID: EXIT_USAGE,
    Category.NOT_FOUND: EXIT_NOT_FOUND,
    Category.REFUSED: EXIT_ROLLED_BACK,
    Category.BUSY: EXIT_BUSY,
    Category.ABORTED: EXIT_BUSY,
    Category.UNREACHABLE: EXIT_UNREACHABLE,
    Category.TIMED_OUT: EXIT_TIMED_OUT,
    Category.DENIED: EXIT_ERROR,
    Category.FAILED: EXIT_ERROR,
    Category.INTERNAL: EXIT_ERROR,
}

INTERNAL_HINT = "this is a bug in ptmig: run the command again with -v and report what it logs"


def one_line(text: str) -> str:
    """`text` with newlines and other unprintable characters escaped, as repr() does."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def fail(message: object) -> None:
    print(f"ptmig: {one_line(str(message))}", file=sys.stderr)


def error_line(what: str, exc: BaseException) -> str:
    """``<what failed>: <why>[; <what to do>]`` for *exc* (the line ``ptmig:`` prints)."""
    why = str(exc) or type(exc).__name__
    category = category_of(exc)
    if category is Category.INTERNAL:
        why = f"internal error: {type(exc).__name__}: {why}"
        hint = INTERNAL_HINT
    else:
        hint = _hint(exc)
    line = f"{what}: {why}" if what else why
    return f"{line}; {hint}" if hint and hint not in why else line


def _hint(exc: BaseException | None) -> str:
    """The first hint in *exc*'s chain of causes: a refusal because the agent does not
    answer says what to do about the agent."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, PtmigError) and exc.hint:
            return exc.hint
        exc, seen = exc.__cause__, seen + 1
    return ""


def fail_with(what: str, exc: BaseException) -> int:
    """Print *exc* as ptmig's one error line on stderr; its category's exit code."""
    fail(error_line(what, exc))
    return EXIT_FOR[category_of(exc)]
