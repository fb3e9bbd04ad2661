"""The root of every error ptmig raises on purpose, and the category a caller is told.

A face catches :class:`PtmigError` and answers in one line: ``ptmig`` with a message and
the exit code of the error's :class:`Category` (host/commandline/exits.py), ``ptmigd``
with the gRPC status of the same category (host/daemon/errors.py); both tables are in
docs/operator-guide.md.  Each class says its category once, as a class attribute; any
other exception is a defect of ptmig (``INTERNAL``).  Each family keeps the builtin base
it had (``ValueError`` for bad input, ``RuntimeError`` for a failure, ``LookupError`` for
a name not found), so callers that catch those go on working."""

from __future__ import annotations

import enum


class Category(enum.StrEnum):
    """What a caller can do about an error: the one thing both faces translate."""

    INVALID = "invalid"  # a malformed request: URI, name, MAC, address, option
    NOT_FOUND = "not-found"  # it names a domain, pool, team or workflow that is not there
    REFUSED = "refused"  # the state of the domain, guest or host forbids it; nothing changed
    BUSY = "busy"  # another workflow holds the domain (journal or lease)
    ABORTED = "aborted"  # another workflow took the domain while this one ran
    UNREACHABLE = "unreachable"  # a host's libvirtd or the guest's agent cannot be reached
    TIMED_OUT = "timed-out"  # it did not finish within its deadline
    DENIED = "denied"  # libvirt refused ptmig's credentials
    FAILED = "failed"  # libvirt, the guest or the journal failed in a way ptmig cannot name
    INTERNAL = "internal"  # a defect of ptmig itself: report it


class PtmigError(Exception):
    """Something ptmig refuses or cannot do, said in the user's terms.

    ``category`` says what kind of failure it is for the caller, set once on each class
    (AgentError's comes from the agent's own status code); ``hint``, when there is one,
    what to do about it (``ptmig`` prints it after the message)."""

    category: Category = Category.FAILED
    hint: str = ""


def category_of(exc: BaseException) -> Category:
    """The caller-facing category of *exc*: its class's, or INTERNAL for anything ptmig did
    not raise on purpose."""
    if isinstance(exc, PtmigError):
        return exc.category
    return Category.INTERNAL
