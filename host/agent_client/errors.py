"""The one exception of the agent channel, and guest text made safe to show."""

from __future__ import annotations

from host.errors import PtmigError


class AgentError(PtmigError, RuntimeError):
    """The agent answered with an error, broke the protocol, or did not answer in time.

    ``code`` is the gRPC status code name (``NOT_FOUND``, ``DEADLINE_EXCEEDED``, ...) or
    ``PROTOCOL`` for a reply that failed validation.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def printable(text: str, limit: int = 300) -> str:
    """A guest-supplied string made safe to log and show."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")
