"""Log lines that carry the domain, workflow id and phase as fields (journald, grep, Loki).

A log call deep in the hypervisor layer should name the migration it serves without
being handed it, so the workflow sets the fields in a context (:func:`log_fields`) and
every line logged inside it carries them.  ptmigd writes one event per line in logfmt
(``level=info logger=... domain=web1 workflow=3f2a phase=unplug msg="..."``); under
systemd stderr is the journal, which stamps each line itself, so the timestamp is left
out there.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from types import MappingProxyType
from typing import ParamSpec, TypeVar

#: The fields ptmig sets, in the order a line shows them.
FIELDS = ("domain", "workflow", "phase", "team")

_fields: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "ptmig_log_fields", default=MappingProxyType({})
)

P = ParamSpec("P")
R = TypeVar("R")


@contextmanager
def log_fields(**fields: str) -> Iterator[None]:
    """Within the block, every log line of this thread carries `fields` too."""
    token = _fields.set({**_fields.get(), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _fields.reset(token)


def current_fields() -> dict[str, str]:
    return dict(_fields.get())


def in_this_context(fn: Callable[P, R]) -> Callable[P, R]:
    """`fn`, to run on another thread with the fields of the caller (threads start empty)."""
    context = contextvars.copy_context()

    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return context.copy().run(fn, *args, **kwargs)

    return run


def _quote(value: str) -> str:
    if value and all(c.isalnum() or c in "-_.:/@+" for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """``[time=...] level=... logger=... <fields> msg="..."``: one event, one line."""

    def __init__(self, *, timestamps: bool | None = None) -> None:
        super().__init__()
        # JOURNAL_STREAM is set by systemd when stderr is connected to the journal.
        self.timestamps = "JOURNAL_STREAM" not in os.environ if timestamps is None else timestamps

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.timestamps:
            parts.append(f"time={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')}")
        parts += [f"level={record.levelname.lower()}", f"logger={record.name}"]
        fields = getattr(record, "ptmig_fields", None)
        if fields is None:
            fields = _fields.get()
        parts += [f"{k}={_quote(fields[k])}" for k in FIELDS if k in fields]
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        parts.append(f"msg={_quote(message)}")
        return " ".join(parts)


def configure(level: int) -> None:
    """ptmigd's logging: logfmt lines on stderr with the context's fields."""
    handler = logging.StreamHandler()
    handler.setFormatter(LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
