"""The root of every error ptmig raises on purpose.

A face catches :class:`PtmigError` and answers in one line (``ptmig``: a message and an
exit code; ``ptmigd``: a gRPC status, by the type table of host/daemon/errors.py); any
other exception is a bug.  Each family keeps the builtin base it had (``ValueError`` for
bad input, ``RuntimeError`` for a failure, ``LookupError`` for a name not found), so
callers that catch those go on working."""

from __future__ import annotations


class PtmigError(Exception):
    """Something ptmig refuses or cannot do, said in the user's terms."""
