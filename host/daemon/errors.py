"""How ptmigd answers a failure: a gRPC status with one line, never a traceback.

An exception class may choose its status with a class attribute ``code =
"FAILED_PRECONDITION"`` (a ``grpc.StatusCode`` name, the convention of guest_agent's
TeamError); otherwise :func:`status_for` maps by type.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, NoReturn

import grpc

from host.migration_options import InvalidMigrationOptions
from host.workflow.journal import JournalError, WorkflowConflict

log = logging.getLogger("ptmig.daemon")

MAX_MESSAGE_CHARS = 1000


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message a client gets for `exc` (never a traceback)."""
    message = one_line(str(exc)) or type(exc).__name__
    named = getattr(exc, "code", None)
    if isinstance(named, str) and isinstance(
        getattr(grpc.StatusCode, named, None), grpc.StatusCode
    ):
        return getattr(grpc.StatusCode, named), message
    table: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Any], ...] = (
        (WorkflowConflict, grpc.StatusCode.ALREADY_EXISTS),
        (InvalidMigrationOptions, grpc.StatusCode.INVALID_ARGUMENT),
        (JournalError, grpc.StatusCode.INTERNAL),
        (PermissionError, grpc.StatusCode.PERMISSION_DENIED),
        (TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
        ((LookupError, FileNotFoundError), grpc.StatusCode.NOT_FOUND),
        (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
        ((ValueError, TypeError), grpc.StatusCode.INVALID_ARGUMENT),
        (ConnectionError, grpc.StatusCode.UNAVAILABLE),
    )
    for types, code in table:
        if isinstance(exc, types):
            return code, message
    return grpc.StatusCode.INTERNAL, f"internal error in ptmigd: {type(exc).__name__}: {message}"


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
