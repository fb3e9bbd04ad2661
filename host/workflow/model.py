"""What the workflow takes and gives back: requests, events and reports (plain data)."""

from __future__ import annotations

import enum
import time
from dataclasses import asdict, dataclass, field
from typing import Any


class Outcome(enum.StrEnum):
    """How a workflow ended."""

    DONE = "done"  # every team back on a passthrough primary at the destination
    DONE_DEGRADED = "done-degraded"  # migrated; some team stays on its standby (no free device)
    ROLLED_BACK = "rolled-back"  # not migrated; the VM runs on the source as before
    FAILED = "failed"  # something could not be undone; the report says what to check


@dataclass(frozen=True)
class MigrationRequest:
    domain: str  # name or UUID
    source_uri: str
    destination_uri: str
    #: Allow migrating disks with a cache mode libvirt deems unsafe (the lab's shared qcow2).
    unsafe: bool = False
    #: Passed to libvirt's migrateSetMaxDowntime when set.
    max_downtime_ms: int | None = None
    #: Peer-to-peer migration URI the source libvirtd uses to reach the destination, when
    #: it differs from the one the coordinator uses (``qemu+tcp://...`` vs a local socket).
    peer_uri: str | None = None


@dataclass(frozen=True)
class Event:
    """A step of a running workflow, for progress displays and the Coordinator API stream."""

    workflow_id: str
    phase: str
    state: str  # "started", "done", "failed", "compensated", "progress", "info"
    message: str = ""
    fraction: float | None = None
    at: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PhaseTiming:
    name: str
    seconds: float
    detail: str = ""
    started_at: float = 0.0  # epoch seconds, to line phases up with other measurements


@dataclass
class MigrationReport:
    workflow_id: str
    domain: str
    source_uri: str
    destination_uri: str
    outcome: Outcome
    phases: list[PhaseTiming] = field(default_factory=list)
    teams: dict[str, str] = field(default_factory=dict)  # team -> "primary" | "standby"
    error: str = ""
    migration: dict[str, Any] = field(default_factory=dict)  # libvirt job statistics
    #: Preflight's case per team (host/workflow/drift.py): "plugged", "primary-absent", ...
    drift: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outcome"] = str(self.outcome)
        return d
