"""How ptmigd answers a failure: a gRPC status with one line, never a traceback.

The status is the error's category (host/errors.py) through :data:`STATUS`, the one
table of it (docs/operator-guide.md lists it with the CLI's exit codes).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, NoReturn

import grpc

from host.errors import Category, category_of

log = logging.getLogger("ptmig.daemon")

MAX_MESSAGE_CHARS = 1000

#: The gRPC status of each category.
STATUS: dict[Category, grpc.StatusCode] = {
    Category.INVALID: grpc.StatusCode.INVALID_ARGUMENT,
    Category.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Category.REFUSED: grpc.StatusCode.FAILED_PRECONDITION,
    Category.BUSY: grpc.StatusCode.ALREADY_EXISTS,
    Category.ABORTED: grpc.StatusCode.ABORTED,
    Category.UNREACHABLE: grpc.StatusCode.UNAVAILABLE,
    Category.TIMED_OUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    Category.DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Category.FAILED: grpc.StatusCode.UNKNOWN,
    Category.INTERNAL: grpc.StatusCode.INTERNAL,
}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message a client gets for `exc` (never a traceback)."""
    message = one_line(str(exc)) or type(exc).__name__
    code = STATUS[category_of(exc)]
    if code == grpc.StatusCode.INTERNAL:
        return code, f"internal error in ptmigd: {type(exc).__name__}: {message}"
    return code, message


def one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 3] + "..."


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def abort(context: Any, method: str, error: Refused) -> NoReturn:
    log.info("%s from %s -> %s: %s", method, peer_of(context), error.code.name, error.message)
    context.abort(error.code, error.message)
    raise AssertionError("context.abort returned")  # pragma: no cover


def log_failure(what: str, exc: BaseException) -> None:
    """A refusal in one line; an unexpected failure with its traceback (for ptmigd's log)."""
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed: %s", what, message, exc_info=exc)
    else:
        log.warning("%s refused: %s: %s", what, code.name, message)


def peer_of(context: Any) -> str:
    peer = str(context.peer())
    with contextlib.suppress(Exception):
        names = context.auth_context().get("x509_common_name")
        if names:
            peer += f" (CN={names[0].decode(errors='replace')})"
    return peer
