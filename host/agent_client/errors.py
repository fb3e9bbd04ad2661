"""The one exception of the agent channel, and guest text made safe to show."""

from __future__ import annotations

from host.errors import Category, PtmigError

#: The caller's category for each status the agent (or the channel to it) ends a call
#: with.  The guest is not the caller: its NOT_FOUND or INVALID_ARGUMENT is a state of
#: the guest that forbids the request, not a bad request to ptmig.
AGENT_CATEGORIES = {
    "UNAVAILABLE": Category.UNREACHABLE,
    "CANCELLED": Category.UNREACHABLE,
    "DEADLINE_EXCEEDED": Category.TIMED_OUT,
    "NOT_FOUND": Category.REFUSED,
    "INVALID_ARGUMENT": Category.REFUSED,
    "FAILED_PRECONDITION": Category.REFUSED,
    "ALREADY_EXISTS": Category.REFUSED,
    "ABORTED": Category.REFUSED,
}


class AgentError(PtmigError, RuntimeError):
    """The agent answered with an error, broke the protocol, or did not answer in time.

    ``code`` is the gRPC status code name (``NOT_FOUND``, ``DEADLINE_EXCEEDED``, ...) or
    ``PROTOCOL`` for a reply that failed validation; it decides the ``category``
    (:data:`AGENT_CATEGORIES`, else failed).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.category = AGENT_CATEGORIES.get(code, Category.FAILED)
        if self.category is Category.UNREACHABLE:
            self.hint = "check that ptmig-agent runs in the guest (systemctl status ptmig-agent)"


def printable(text: str, limit: int = 300) -> str:
    """A guest-supplied string made safe to log and show."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")
