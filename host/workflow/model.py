"""What the workflow takes and gives back: requests, events, reports and the Coordinator's
answers (plain data).  The faces encode these types, and only these: one protobuf encoder
per message in ptmigd, one JSON form (:func:`plain`) for ``--json`` and the journal, read
back by :func:`from_plain`."""

from __future__ import annotations

import dataclasses
import enum
import json
import time
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from host.domain.kinds import MacPolicy, PoolKind
from host.domain.teams import PrimaryDevice, Team
from host.errors import Category, PtmigError
from host.migration_options import MigrationOptions, MigrationStats


class Outcome(enum.StrEnum):
    """How a workflow ended, as its journal record says (a migration's report is never
    refused: a refusal raises before there is one)."""

    DONE = "done"  # every team back on a passthrough primary at the destination
    DONE_DEGRADED = "done-degraded"  # migrated; some team stays on its standby (no free device)
    ROLLED_BACK = "rolled-back"  # not migrated; the VM runs on the source as before
    FAILED = "failed"  # something could not be undone; the report says what to check
    REFUSED = "refused"  # preflight, the lease or the journal refused: nothing changed


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
    options: MigrationOptions = field(default_factory=MigrationOptions)
    #: Switch every team to its standby and unplug it, even one whose primary's state QEMU
    #: could copy (host/workflow/hybrid.py): the operator's override for this migration.
    switch_all: bool = False
    #: The same override for these teams only (each must be a team of the domain).
    switch_teams: tuple[str, ...] = ()


#: At most this many migrations an evacuation runs at once.  libvirtd serves a
#: peer-to-peer migration call in one of its worker threads for the whole job
#: (libvirtd.conf ``max_workers = 20`` by default, shared with every other call); 16
#: leaves 4 of them for the XML reads, attaches and job aborts the running workflows
#: and a cancel need meanwhile.  A destination's qemu.conf port range for incoming
#: migrations (``migration_port_min..max``, 49152..49215: 64) is not the bound.
MAX_PARALLEL_MIGRATIONS = 16


class InvalidEvacuation(PtmigError, ValueError):
    """An evacuation request that cannot be run (no target, the source as a target...)."""

    category = Category.INVALID


@dataclass(frozen=True)
class EvacuationTarget:
    uri: str
    #: As MigrationRequest.peer_uri, for migrations to this target.
    peer_uri: str | None = None


@dataclass(frozen=True)
class EvacuationRequest:
    """Move every running domain with ptmig teams off *source_uri*, onto *targets*."""

    source_uri: str
    targets: tuple[EvacuationTarget, ...]
    #: Migrations at once (capped at MAX_PARALLEL_MIGRATIONS: see capped_parallel).
    parallel: int = 1
    #: Domains without teams too, with a plain libvirt migration (``--all``).
    include_untied: bool = False
    #: Passed to each domain's MigrationRequest, as ``migrate`` takes them.
    unsafe: bool = False
    max_downtime_ms: int | None = None
    options: MigrationOptions = field(default_factory=MigrationOptions)

    def __post_init__(self) -> None:
        if not self.targets:
            raise InvalidEvacuation("evacuate: at least one target host is needed")
        uris = [t.uri for t in self.targets]
        if self.source_uri in uris:
            raise InvalidEvacuation(f"evacuate: the source {self.source_uri} is also a target")
        if len(set(uris)) != len(uris):
            raise InvalidEvacuation(f"evacuate: a target is named twice: {uris}")
        if self.parallel < 1:
            raise InvalidEvacuation(f"evacuate: parallel {self.parallel}: must be at least 1")


def capped_parallel(parallel: int) -> tuple[int, str]:
    """The parallelism an evacuation runs with, and why it is less than asked ("" if not)."""
    if parallel <= MAX_PARALLEL_MIGRATIONS:
        return parallel, ""
    return MAX_PARALLEL_MIGRATIONS, (
        f"parallel {parallel} capped at {MAX_PARALLEL_MIGRATIONS}: libvirtd runs each "
        "migration call in one of its worker threads (max_workers = 20 by default)"
    )


class EvacuationOutcome(enum.StrEnum):
    """How one domain of an evacuation ended: a workflow's :class:`Outcome` (the same
    words, taken from it), or one of the three an evacuation adds."""

    DONE = Outcome.DONE.value
    DONE_DEGRADED = Outcome.DONE_DEGRADED.value
    ROLLED_BACK = Outcome.ROLLED_BACK.value
    FAILED = Outcome.FAILED.value
    REFUSED = Outcome.REFUSED.value
    SKIPPED = "skipped"  # no ptmig teams (without include_untied)
    MIGRATED_PLAIN = "migrated-plain"  # no teams; moved by a plain libvirt migration
    NOT_STARTED = "not-started"  # cancelled before its turn came


@dataclass
class DomainEvacuation:
    domain: str
    uuid: str
    destination_uri: str  # "" when skipped
    outcome: EvacuationOutcome
    error: str = ""
    started_at: float = 0.0  # epoch seconds; 0 when it did not start
    seconds: float = 0.0
    report: MigrationReport | None = None  # the workflow's, when one ran


@dataclass
class EvacuationReport:
    source_uri: str
    parallel: int  # the parallelism it ran with (after the cap)
    wall_s: float
    domains: list[DomainEvacuation] = field(default_factory=list)


@dataclass(frozen=True)
class EvacuationEvent:
    """One domain's step in an evacuation, for live displays and the Evacuate stream.

    *phase* is the workflow's ("preflight", "migrate", ...), or "queued" (placed, waiting
    for a worker), "plain" (a plain libvirt migration), "result" (its end: *outcome* set).
    """

    domain: str
    destination_uri: str
    phase: str
    state: str
    outcome: str = ""  # an EvacuationOutcome's value once the domain ended, else ""
    message: str = ""
    fraction: float | None = None
    workflow_id: str = ""
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class Event:
    """A step of a running workflow, for progress displays and the Coordinator API stream."""

    workflow_id: str
    phase: str
    state: str  # "started", "done", "failed", "compensated", "progress", "info"
    message: str = ""
    fraction: float | None = None
    at: float = field(default_factory=time.time)
    #: Past the point of no return: the VM has moved (the migrate step is done), so a
    #: cancel comes too late and the bind finishes.  Set by the workflow, read by the
    #: faces (``ptmig migrate``'s SIGINT line), which parse no event text for it.
    moved: bool = False


@dataclass
class PhaseTiming:
    name: str
    seconds: float
    detail: str = ""
    started_at: float = 0.0  # epoch seconds, to line phases up with other measurements


@dataclass(frozen=True)
class BindTiming:
    """Where one team's way back onto a primary went, on the coordinator's clock (epoch
    seconds): the attach call made and returned, libvirt's DEVICE_ADDED event for the
    device (None: not seen before the bind ended), the agent's BindPrimary called and
    answered (or failed).  The guest's side of the same seconds (probe, carrier, enslave,
    active) is in the agent's and the kernel's log; ``ptmig-lab bench-migration`` lines
    both up.  Not carried by the gRPC contract (like ``why``): the JSON form has it."""

    attach_called: float
    attach_returned: float
    device_added: float | None
    bind_called: float
    bound: float


@dataclass
class MigrationReport:
    workflow_id: str
    domain: str
    source_uri: str
    destination_uri: str
    outcome: Outcome
    phases: list[PhaseTiming] = field(default_factory=list)
    teams: dict[str, TeamMode] = field(default_factory=dict)  # PRIMARY or STANDBY
    #: team -> why it did not reach the mode asked for (a bind that failed, no device)
    why: dict[str, str] = field(default_factory=dict)
    error: str = ""
    #: The migration job's statistics; None when the workflow never got that far.
    migration: MigrationStats | None = None
    #: Preflight's case per team (host/workflow/drift.py): "plugged", "primary-absent", ...
    drift: dict[str, str] = field(default_factory=dict)
    #: Stopped by a cancel (``ptmig cancel``, the Cancel RPC, SIGINT or SIGTERM) before the
    #: point of no return; the outcome says whether the rollback made it as it was.
    cancelled: bool = False
    #: Which way each team went and why: ``copy-state: ...`` (its primary stayed plugged,
    #: QEMU copied its state) or ``switch: ...`` (host/workflow/hybrid.py).
    ways: dict[str, str] = field(default_factory=dict)
    #: Each mediated device the domain holds, by UUID: how it went (``copy-state: ...``,
    #: carried by QEMU's state copy onto the destination's mdev; host/workflow/hybrid.py).
    devices: dict[str, str] = field(default_factory=dict)
    #: Each plugged team's bind on the coordinator's clock (``BindTiming``).
    binds: dict[str, BindTiming] = field(default_factory=dict)


# -- what the Coordinator answers (one type per answer; the faces encode these only) --------


class TeamMode(enum.StrEnum):
    """Where a team's traffic runs, as ``status`` finds it."""

    PRIMARY = "primary"  # the recorded primary is plugged and the bond's active member
    STANDBY = "standby"  # the primary is plugged but the virtio standby carries traffic
    DEGRADED = "degraded"  # no primary plugged: the team runs on its standby until repaired
    UNKNOWN = "unknown"  # the agent could not say (unreachable, or does not know the team)


def team_modes(on_primary: dict[str, bool]) -> dict[str, TeamMode]:
    """Each team's mode from whether its primary is the bond's active member."""
    return {name: TeamMode.PRIMARY if on else TeamMode.STANDBY for name, on in on_primary.items()}


@dataclass(frozen=True)
class GuestEvent:
    """What a guest's agent last did on its own for a guest-managed team, as it said it:
    the texts made printable and bounded (host/agent_client/replies.py), the time by the
    guest's clock."""

    kind: str  # "primary-lost", "primary-bound"
    device: str
    reason: str
    ok: bool
    detail: str
    unix_ms: int


@dataclass(frozen=True)
class TeamStatus:
    name: str
    mode: TeamMode
    pool: str
    mac_policy: str
    primary: PrimaryDevice | None = None  # as recorded in the metadata
    active_member: str = ""  # the guest link that carries traffic, when the agent says
    members: tuple[str, ...] = ()
    detail: str = ""  # why the mode is unknown
    #: The team's case as host/workflow/drift.py classifies it ("plugged", "primary-absent"...).
    case: str = ""
    #: How the metadata, the live domain and the guest disagree, in one line a person can
    #: act on; "" when they agree.
    drift: str = ""
    #: Whether a migration could copy the primary's state (host/workflow/hybrid.py): ""
    #: unless the team's pool here is marked state-copy.
    way: str = ""
    #: The guest's agent keeps the team whole by itself (managed_by = "guest").
    managed_by_guest: bool = False
    last_event: GuestEvent | None = None


@dataclass(frozen=True)
class DomainStatus:
    domain: str
    uuid: str
    uri: str
    teams: tuple[TeamStatus, ...]
    open_workflow_id: str = ""  # the domain's open workflow in the journal, "" if none
    agent_error: str = ""  # why the agent could not be asked, "" if it answered
    #: Each mediated device the domain holds, by UUID: whether a migration could carry it
    #: (host/workflow/hybrid.py, ``devices_here``).
    devices: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DomainTeams:
    """A domain's teams as its metadata records them."""

    domain: str
    uuid: str
    teams: tuple[Team, ...]
    #: Per team, its case as the live domain has it ("plugged", "primary-absent", ...) and
    #: the one line saying how the record differs ("" when it does not).  Classified
    #: without asking the agent.
    cases: dict[str, str] = field(default_factory=dict)
    drift: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TeamRequest:
    """``team_set``'s input: a team to add or replace in a domain's metadata."""

    name: str
    standby_mac: str
    pool: str
    mac_policy: MacPolicy = MacPolicy.PRESERVE
    team_mac: str | None = None
    #: Alias of the primary plugged now; its kind and host identity are read from the domain.
    primary_alias: str | None = None


@dataclass(frozen=True)
class PoolStatus:
    name: str
    kind: PoolKind
    total: int  # devices in the pool (0 for a VF network that lists no VFs: see error)
    free: int | None  # None when it cannot be computed (see error)
    #: Free PCI addresses or taps; empty for a VF network (libvirt picks the VF at attach).
    free_devices: tuple[str, ...] = ()
    error: str = ""


@dataclass(frozen=True)
class FailoverResult:
    workflow_id: str
    domain: str
    to: TeamMode  # PRIMARY or STANDBY
    teams: dict[str, TeamMode] = field(default_factory=dict)  # PRIMARY or STANDBY
    #: team -> why it did not reach the mode asked for (a bind that failed, no device)
    why: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class RepairResult:
    """What the reconciler did for one degraded domain."""

    workflow_id: str
    domain_uuid: str
    teams: dict[str, TeamMode] = field(default_factory=dict)  # PRIMARY or STANDBY
    #: team -> why it did not reach the mode asked for (a bind that failed, no device)
    why: dict[str, str] = field(default_factory=dict)
    error: str = ""  # why the repair failed


#: ``RecoverResult.action`` of an open workflow whose coordinator still runs (left alone).
STILL_RUNNING = "still running"


@dataclass(frozen=True)
class RecoverResult:
    workflow_id: str
    domain: str
    action: str  # the outcome reached, or STILL_RUNNING
    outcome: Outcome | None = None  # None when left alone
    detail: str = ""  # what recovery found ("on the source; teams {...}")
    error: str = ""  # why recovery failed, when it raised


@dataclass(frozen=True)
class WorkflowSummary:
    """A journal row as the faces show it."""

    id: str
    kind: str  # "migrate", "failover", "repair", "team-set", ...
    domain_uuid: str  # for a pool workflow: the pool's journal subject ("pool NAME@URI")
    domain_name: str
    source_uri: str
    destination_uri: str
    state: str  # "open", "closed"
    outcome: str  # "" while open; the outcome as the journal spells it
    created: float
    updated: float
    owner_alive: bool  # for open workflows: is its coordinator still running?
    report_json: str  # the final report, a JSON object; "" while open


@dataclass(frozen=True)
class CancelResult:
    """What ``cancel`` did to a domain's running migration."""

    workflow_id: str
    domain: str
    phase: str  # the workflow's step when the cancel was asked ("switch", "migrate", ...)
    #: True: asked before the point of no return (the workflow stops and rolls back);
    #: False: the VM has moved, the bind finishes (nothing was asked of the workflow).
    accepted: bool
    ended: bool = False  # the workflow ended within the wait
    outcome: Outcome | None = None  # its outcome, once ended
    cancelled: bool = False  # it ended by the cancel (its report says cancelled)
    message: str = ""  # one line for people


def plain(value: object) -> Any:
    """The JSON form of any result above (``--json``, the journal): dataclasses as
    objects, enums as their values, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def to_json(value: object) -> str:
    return json.dumps(plain(value), indent=1, default=str)


_T = TypeVar("_T")


def from_plain(cls: type[_T], value: object) -> _T:
    """The result of type *cls* whose :func:`plain` form is *value* (``ptmig ... --json``
    parsed), so a reader of the CLI's output (the lab, the e2e tests) gets the typed
    result instead of declaring its shape again.  ValueError names the first place
    that is not as *cls* declares it (an unknown or missing field, a wrong type)."""
    decoded: _T = _decode(cls, value, cls.__name__)
    return decoded


def _decode(hint: Any, value: object, where: str) -> Any:
    """*value* as the type *hint* (a field's annotation) says, checked."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _decode(arg, value, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError("; ".join(errors) or f"{where}: {value!r} is not {hint}")
    if origin in (list, tuple) and isinstance(value, list):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                raise ValueError(f"{where}: {len(value)} items, not {len(args)}")
            return tuple(
                _decode(a, v, f"{where}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        items = [_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict and isinstance(value, dict):
        return {
            _decode(args[0], k, f"{where} key"): _decode(args[1], v, f"{where}[{k!r}]")
            for k, v in value.items()
        }
    if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
        fields = {f.name for f in dataclasses.fields(hint) if f.init}
        unknown = sorted(set(value) - fields)
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
        hints = typing.get_type_hints(hint)
        kwargs = {k: _decode(hints[k], v, f"{where}.{k}") for k, v in value.items()}
        try:
            return hint(**kwargs)
        except TypeError as exc:  # a required field missing
            raise ValueError(f"{where}: {exc}") from None
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ValueError(f"{where}: {value!r} is not a {hint.__name__}") from None
    if hint is float and type(value) in (int, float):
        return float(typing.cast(float, value))
    if hint in (str, int, bool) and type(value) is hint:
        return value
    raise ValueError(f"{where}: {value!r} is not {getattr(hint, '__name__', hint)}")
