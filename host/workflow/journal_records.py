"""What the journal holds: its errors, the workflow and step records with their words,
and the plain JSON it accepts for requests, step data and reports."""

from __future__ import annotations

import enum
import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from host.errors import Category, PtmigError

MAX_DATA_JSON_CHARS = 1024 * 1024  # a step's data is a few addresses and names, not logs


class JournalError(PtmigError):
    """The journal cannot be used (unreadable, corrupt, newer schema) or was misused."""


class JournalDataError(JournalError, ValueError):
    """A request, step data or report that is not plain JSON (ptmig's own data: a defect)."""

    category = Category.INTERNAL


class JournalUnwritable(JournalError):
    """The journal's filesystem is full or read-only: no workflow can be recorded, so
    none begins (nothing was changed)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code  # the gRPC status ptmigd answers with (host/daemon/errors.py)


class UnknownWorkflow(JournalError, LookupError):
    """No workflow with that id."""

    category = Category.NOT_FOUND


class WorkflowClosed(JournalError):
    """The workflow was already finished; it takes no more steps."""

    category = Category.REFUSED


class WorkflowKind(enum.StrEnum):
    MIGRATE = "migrate"
    FAILOVER = "failover"
    REPAIR = "repair"
    # One libvirt call each, journaled so that every change ptmig makes has a record.
    TEAM_SET = "team-set"
    TEAM_REMOVE = "team-remove"
    POOL_DEFINE = "pool-define"
    POOL_UNDEFINE = "pool-undefine"


class WorkflowState(enum.StrEnum):
    OPEN = "open"
    CLOSED = "closed"


class StepStatus(enum.StrEnum):
    STARTED = "started"  # recorded before the action
    DONE = "done"
    FAILED = "failed"
    COMPENSATING = "compensating"  # recorded before the compensation
    COMPENSATED = "compensated"


@dataclass(frozen=True)
class StepRecord:
    workflow_id: str
    seq: int
    name: str
    status: StepStatus
    data: dict[str, Any]
    at: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = str(self.status)
        return d


@dataclass(frozen=True)
class WorkflowRecord:
    id: str
    kind: WorkflowKind
    domain_uuid: str
    domain_name: str
    source_uri: str
    destination_uri: str
    state: WorkflowState
    outcome: str | None
    created: float
    updated: float
    owner_pid: int
    owner_start: int | None  # /proc/PID/stat field 22 (clock ticks after boot)
    owner_boot_id: str | None
    request: dict[str, Any]
    report: dict[str, Any] | None

    @property
    def is_open(self) -> bool:
        return self.state is WorkflowState.OPEN

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = str(self.kind)
        d["state"] = str(self.state)
        return d


@dataclass(frozen=True)
class CancelRequest:
    workflow_id: str
    requested: float  # epoch seconds
    requested_by: str  # who asked, in words ("ptmig cancel (pid 123)", "SIGINT")


class WorkflowConflict(JournalError):
    """The domain already has an open workflow (running, or left by a dead coordinator)."""

    category = Category.BUSY

    def __init__(self, open_workflow: WorkflowRecord, owner_alive: bool) -> None:
        self.open_workflow = open_workflow
        self.owner_alive = owner_alive
        w = open_workflow
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(w.created))
        if owner_alive:
            how = f"still running in pid {w.owner_pid}"
        else:
            how = f"its coordinator (pid {w.owner_pid}) is gone: run `ptmig recover`"
        super().__init__(
            f"domain {w.domain_name or w.domain_uuid} already has an open {w.kind} workflow "
            f"{w.id} (since {since}, {w.source_uri} -> {w.destination_uri}); {how}"
        )


# -- JSON ----------------------------------------------------------------------------


def to_json(value: Mapping[str, Any], what: str) -> str:
    """`value` as compact JSON, or :class:`JournalDataError` saying which part is not JSON.

    Accepted: dicts with str keys, lists, tuples, str, int, finite float, bool, None.
    (``json.dumps`` alone would turn int keys into strings and NaN into invalid JSON.)
    """
    if not isinstance(value, Mapping):
        raise JournalDataError(f"{what} must be a JSON object, not {type(value).__name__}")
    _check_json(value, what, depth=0)
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    if len(text) > MAX_DATA_JSON_CHARS:
        raise JournalDataError(
            f"{what} is {len(text)} characters of JSON; the limit is {MAX_DATA_JSON_CHARS}"
        )
    return text


def _check_json(value: object, where: str, depth: int) -> None:
    if depth > 64:
        raise JournalDataError(f"{where}: nested too deeply for the journal")
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise JournalDataError(f"{where}: {value} is not a JSON number")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise JournalDataError(
                    f"{where}: key {key!r} is a {type(key).__name__}; JSON keys are strings"
                )
            _check_json(item, f"{where}[{key!r}]", depth + 1)
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json(item, f"{where}[{index}]", depth + 1)
        return
    raise JournalDataError(f"{where}: a {type(value).__name__} is not JSON ({value!r:.60})")


def json_object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("stored JSON is not an object")
    return value


E = TypeVar("E", bound=enum.StrEnum)


def checked_enum(cls: type[E], value: E | str, what: str) -> E:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(str(m) for m in cls)
        raise JournalDataError(f"{what} {value!r} is not one of {choices}") from None
