"""ptmigd: the Coordinator gRPC service (protos/ptmig/v1/coordinator.proto).

The servicer is a thin face: it turns messages into calls on a :class:`Coordinator`
(the workflow's entry point; tests use a fake) and answers back, never the reverse.

Who may call
    By default ptmigd listens on one unix socket, ``/run/ptmig/ptmigd.sock``.  The
    socket is 0600 (bound under umask 177, then chmod'ed) in a directory that must
    be owned by ptmigd's user (root in production) with mode 0700: ptmigd creates it
    so when missing and refuses to start when it exists with another owner or mode,
    or is a symlink.  Only that user (and root) can connect.  gRPC Python does not
    expose the peer's SO_PEERCRED credentials (``context.peer()`` is just
    ``unix:...``), so the file permissions *are* the access control; they are
    checked, not assumed.
    TCP is served only with ``--listen-tcp HOST:PORT`` together with ``--tls-cert``,
    ``--tls-key`` and ``--tls-client-ca``: mutual TLS, a client must present a
    certificate issued by that CA.  TCP without them is refused at start.

Errors
    Exceptions from the coordinator become a gRPC status and a one-line message,
    never a traceback (that goes to ptmigd's log).  An exception class may choose
    its status with a class attribute ``code = "FAILED_PRECONDITION"`` (a
    ``grpc.StatusCode`` name, the convention of guest_agent's TeamError); otherwise
    :func:`status_for` maps by type.  A migration that rolled back or failed after it
    started is not an RPC error: the stream ends normally with its report.

Migrate and clients that go away
    The migration runs in its own (non-daemon) worker thread; its events go through a
    queue to the RPC's stream.  If the client cancels or disconnects, that is logged
    and the stream stops, but the migration goes on: a half-finished migration (a
    detached device, a guest on its standby, a half-copied VM) must be finished or
    rolled back, never abandoned because a client went away.  Its outcome is
    logged and is in the journal (ListWorkflows).  On SIGTERM ptmigd stops taking
    RPCs and waits for running migrations before it exits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import signal
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from ptmig.v1 import coordinator_pb2 as pb
from ptmig.v1 import coordinator_pb2_grpc as pb_grpc

from host.domain.pools import Pool, TapSlot, make_pool
from host.domain.teams import PrimaryDevice, Team
from host.workflow.journal import DEFAULT_PATH as DEFAULT_JOURNAL
from host.workflow.journal import JournalError, WorkflowConflict
from host.workflow.model import (
    DomainStatus,
    DomainTeams,
    Event,
    FailoverResult,
    MigrationReport,
    MigrationRequest,
    Outcome,
    PoolStatus,
    RecoverResult,
    TeamMode,
    TeamRequest,
    TeamStatus,
    WorkflowSummary,
    plain,
)


class Coordinator(Protocol):
    """What ptmigd needs of the workflow (host.workflow.coordinator.Coordinator)."""

    def migrate(
        self, request: MigrationRequest, on_event: Callable[[Event], None]
    ) -> MigrationReport:
        """Run one migration to its end; `on_event` is called from the same thread."""
        ...

    def status(self, uri: str, domain: str) -> DomainStatus: ...

    def pools(self, uri: str) -> list[PoolStatus]: ...

    def recover(self) -> list[RecoverResult]: ...

    def workflows(self, limit: int) -> list[WorkflowSummary]: ...

    def failover(self, uri: str, domain: str, to: TeamMode) -> FailoverResult: ...

    def team_show(self, uri: str, domain: str) -> DomainTeams: ...

    def team_set(self, uri: str, domain: str, request: TeamRequest) -> DomainTeams: ...

    def team_remove(self, uri: str, domain: str, team: str) -> DomainTeams: ...

    def pool_define(self, uri: str, pool: Pool) -> PoolStatus: ...

    def pool_undefine(self, uri: str, name: str) -> None: ...


log = logging.getLogger("ptmig.daemon")

DEFAULT_SOCKET = Path("/run/ptmig/ptmigd.sock")
DEFAULT_URI = "qemu:///system"
RPC_THREADS = 16
STOP_GRACE_S = 5.0
POLL_S = 0.5  # how often a waiting Migrate stream looks whether its client is still there
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 1000
MAX_MESSAGE_CHARS = 1000


T = TypeVar("T")


class ConfigError(Exception):
    """ptmigd cannot start with this configuration; the message says why."""


# -- errors ----------------------------------------------------------------------------


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status and message a client gets for `exc` (never a traceback)."""
    message = _one_line(str(exc)) or type(exc).__name__
    named = getattr(exc, "code", None)
    if isinstance(named, str) and isinstance(
        getattr(grpc.StatusCode, named, None), grpc.StatusCode
    ):
        return getattr(grpc.StatusCode, named), message
    table: tuple[tuple[type[BaseException] | tuple[type[BaseException], ...], Any], ...] = (
        (WorkflowConflict, grpc.StatusCode.ALREADY_EXISTS),
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


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_MESSAGE_CHARS else line[: MAX_MESSAGE_CHARS - 3] + "..."


class _Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _abort(context: Any, method: str, error: _Refused) -> NoReturn:
    log.info("%s from %s -> %s: %s", method, _peer(context), error.code.name, error.message)
    context.abort(error.code, error.message)
    raise AssertionError("context.abort returned")  # pragma: no cover


def _log_failure(what: str, exc: BaseException) -> None:
    """A refusal in one line; an unexpected failure with its traceback (for ptmigd's log)."""
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("%s failed: %s", what, message, exc_info=exc)
    else:
        log.warning("%s refused: %s: %s", what, code.name, message)


def _peer(context: Any) -> str:
    peer = str(context.peer())
    with contextlib.suppress(Exception):
        names = context.auth_context().get("x509_common_name")
        if names:
            peer += f" (CN={names[0].decode(errors='replace')})"
    return peer


# -- messages --------------------------------------------------------------------------

_OUTCOMES: dict[Outcome, Any] = {
    Outcome.DONE: pb.OUTCOME_DONE,
    Outcome.DONE_DEGRADED: pb.OUTCOME_DONE_DEGRADED,
    Outcome.ROLLED_BACK: pb.OUTCOME_ROLLED_BACK,
    Outcome.FAILED: pb.OUTCOME_FAILED,
}
_TEAM_MODES = {
    TeamMode.PRIMARY: pb.TEAM_MODE_PRIMARY,
    TeamMode.STANDBY: pb.TEAM_MODE_STANDBY,
    TeamMode.DEGRADED: pb.TEAM_MODE_DEGRADED,
    TeamMode.UNKNOWN: pb.TEAM_MODE_UNSPECIFIED,
}


def migration_request(message: Any) -> MigrationRequest:
    """The workflow's request for a MigrateRequest; ValueError names a missing field."""
    for name in ("domain", "source_uri", "destination_uri"):
        if not getattr(message, name):
            raise ValueError(f"MigrateRequest.{name} is required")
    return MigrationRequest(
        domain=message.domain,
        source_uri=message.source_uri,
        destination_uri=message.destination_uri,
        unsafe=message.unsafe,
        max_downtime_ms=message.max_downtime_ms or None,
        peer_uri=message.peer_uri or None,
    )


def _required(message: Any, *names: str) -> None:
    for name in names:
        if not getattr(message, name):
            raise ValueError(f"{type(message).__name__}.{name} is required")


def failover_target(message: Any) -> TeamMode:
    """The mode a FailoverRequest asks for; ValueError unless primary or standby."""
    _required(message, "domain")
    targets = {pb.TEAM_MODE_PRIMARY: TeamMode.PRIMARY, pb.TEAM_MODE_STANDBY: TeamMode.STANDBY}
    if message.to not in targets:
        raise ValueError("FailoverRequest.to must be TEAM_MODE_PRIMARY or TEAM_MODE_STANDBY")
    return targets[message.to]


def team_request(message: Any) -> TeamRequest:
    """The Coordinator's TeamRequest for a SetTeamRequest (values checked by Team)."""
    _required(message, "domain", "name", "standby_mac", "pool")
    return TeamRequest(
        name=message.name,
        standby_mac=message.standby_mac,
        pool=message.pool,
        mac_policy=message.mac_policy or "preserve",
        team_mac=message.team_mac or None,
        primary_alias=message.primary_alias or None,
    )


def pool_definition(message: Any) -> Pool:
    """The Pool a DefinePoolRequest describes; DomainModelError (a ValueError) if wrong."""
    _required(message, "name", "kind")
    return make_pool(
        message.name,
        message.kind,
        bridge=message.bridge,
        model=message.model,
        slots=[TapSlot(s.tap, s.mac) for s in message.slots],
        addresses=message.addresses,
        pf=message.pf,
        vf_addresses=message.vf_addresses,
    )


def outcome_enum(outcome: str | None) -> Any:
    """The Outcome enum for an outcome as the workflow or journal spells it (UNSPECIFIED
    for none, or for one the contract has no value for, like a refused migration's)."""
    try:
        return _OUTCOMES[Outcome(outcome or "")]
    except ValueError:
        return pb.OUTCOME_UNSPECIFIED


def event_message(event: Event) -> Any:
    message = pb.WorkflowEvent(
        workflow_id=event.workflow_id,
        phase=event.phase,
        state=event.state,
        message=event.message,
        at=event.at,
    )
    if event.fraction is not None:
        message.fraction = event.fraction
    return message


def report_message(report: MigrationReport) -> Any:
    return pb.MigrationReport(
        workflow_id=report.workflow_id,
        domain=report.domain,
        source_uri=report.source_uri,
        destination_uri=report.destination_uri,
        outcome=outcome_enum(report.outcome),
        outcome_text=str(report.outcome),
        phases=[
            pb.PhaseTiming(name=p.name, seconds=p.seconds, detail=p.detail) for p in report.phases
        ],
        teams={str(k): str(v) for k, v in report.teams.items()},
        error=report.error,
        migration_json=_json(report.migration),
    )


def final_event(report: MigrationReport) -> Any:
    """The last message of a Migrate stream: phase "report", state = the outcome."""
    return pb.WorkflowEvent(
        workflow_id=report.workflow_id,
        phase="report",
        state=str(report.outcome),
        message=report.error or f"{report.domain}: {report.outcome}",
        at=time.time(),
        report=report_message(report),
    )


def primary_message(primary: PrimaryDevice | None) -> Any:
    """A PrimaryDevice message; None for no primary (the field stays unset)."""
    if primary is None:
        return None
    return pb.PrimaryDevice(
        kind=primary.kind,
        alias=primary.alias,
        mac=primary.mac or "",
        pci_address=primary.pci_address or "",
        network=primary.network or "",
        tap=primary.tap or "",
    )


def team_status_message(team: TeamStatus) -> Any:
    return pb.TeamStatus(
        name=team.name,
        mode=_TEAM_MODES[team.mode],
        mode_text=str(team.mode),
        active_member=team.active_member,
        detail=team.detail,
        pool=team.pool,
        mac_policy=team.mac_policy,
        primary=primary_message(team.primary),
        members=list(team.members),
        drift=team.drift,
    )


def status_message(status: DomainStatus) -> Any:
    return pb.GetStatusResponse(
        domain=status.domain,
        uri=status.uri,
        teams=[team_status_message(t) for t in status.teams],
        open_workflow_id=status.open_workflow_id,
        details_json=_json(status),
        uuid=status.uuid,
        agent_error=status.agent_error,
    )


def pool_message(pool: PoolStatus) -> Any:
    return pb.Pool(
        name=pool.name,
        kind=str(pool.kind),
        total=pool.total,
        free=pool.free or 0,
        free_devices=list(pool.free_devices),
        details_json=_json(pool),
        error=pool.error,
    )


def recover_result(result: RecoverResult) -> Any:
    return pb.RecoverResult(
        workflow_id=result.workflow_id,
        domain=result.domain,
        action=result.action,
        outcome=outcome_enum(result.outcome),
        outcome_text="" if result.outcome is None else str(result.outcome),
        error=result.error,
        details_json=_json(result),
        detail=result.detail,
    )


def failover_message(result: FailoverResult) -> Any:
    return pb.FailoverResponse(
        workflow_id=result.workflow_id,
        domain=result.domain,
        to=_TEAM_MODES[result.to],
        teams=result.teams,
    )


def team_message(team: Team) -> Any:
    return pb.Team(
        name=team.name,
        standby_mac=team.standby_mac,
        pool=team.pool,
        mac_policy=team.mac_policy,
        team_mac=team.team_mac or "",
        primary=primary_message(team.primary),
    )


def teams_message(teams: DomainTeams) -> Any:
    return pb.GetTeamsResponse(
        domain=teams.domain, uuid=teams.uuid, teams=[team_message(t) for t in teams.teams]
    )


def workflow_summary(row: WorkflowSummary) -> Any:
    return pb.WorkflowSummary(
        id=row.id,
        kind=row.kind,
        domain_uuid=row.domain_uuid,
        domain_name=row.domain_name,
        source_uri=row.source_uri,
        destination_uri=row.destination_uri,
        state=row.state,
        outcome=outcome_enum(row.outcome or None),
        outcome_text=row.outcome,
        created=row.created,
        updated=row.updated,
        owner_alive=row.owner_alive,
        report_json=row.report_json,
    )


def _json(value: object) -> str:
    """A ``details_json`` field: the answer's JSON form, compact."""
    return json.dumps(plain(value), default=str, separators=(",", ":"))


# -- the servicer ----------------------------------------------------------------------


class Workers:
    """The migrations' worker threads, so that a stop can wait for them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()

    def start(self, target: Callable[[], None], name: str) -> threading.Thread:
        def run() -> None:
            try:
                target()
            finally:
                with self._lock:
                    self._threads.discard(thread)

        thread = threading.Thread(target=run, name=name, daemon=False)
        with self._lock:
            self._threads.add(thread)
        thread.start()
        return thread

    def running(self) -> list[threading.Thread]:
        with self._lock:
            return list(self._threads)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every worker; whether none is left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self.running():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(left)
        return not self.running()


@dataclass(frozen=True)
class _Finished:
    report: MigrationReport


@dataclass(frozen=True)
class _Crashed:
    error: BaseException


class CoordinatorServicer:
    """ptmig.v1.Coordinator over a :class:`Coordinator` (registered without subclassing
    the generated, untyped base class)."""

    def __init__(self, coordinator: Coordinator, workers: Workers | None = None) -> None:
        self._coordinator = coordinator
        self.workers = workers or Workers()

    def Migrate(self, request: Any, context: Any) -> Iterator[Any]:
        try:
            migration = migration_request(request)
        except ValueError as exc:
            _abort(context, "Migrate", _Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        what = f"{migration.domain} {migration.source_uri} -> {migration.destination_uri}"
        log.info("Migrate %s requested by %s", what, _peer(context))
        items: queue.Queue[Event | _Finished | _Crashed] = queue.Queue()
        listening = threading.Event()
        listening.set()

        def on_event(event: Event) -> None:
            if listening.is_set():
                items.put(event)

        def run() -> None:
            try:
                report = self._coordinator.migrate(migration, on_event)
            except BaseException as exc:
                if listening.is_set():
                    items.put(_Crashed(exc))
                _log_failure(f"Migrate {what}", exc)
                return
            items.put(_Finished(report))
            log.info(
                "Migrate %s: workflow %s ended %s%s",
                what,
                report.workflow_id,
                report.outcome,
                f" ({report.error})" if report.error else "",
            )

        self.workers.start(run, name=f"migrate {migration.domain}")
        ended = False
        workflow_id = ""
        try:
            while True:
                try:
                    item = items.get(timeout=POLL_S)
                except queue.Empty:
                    if not context.is_active():
                        return
                    continue
                if isinstance(item, Event):
                    workflow_id = workflow_id or item.workflow_id
                    yield event_message(item)
                elif isinstance(item, _Finished):
                    ended = True
                    yield final_event(item.report)
                    return
                else:
                    ended = True
                    code, message = status_for(item.error)
                    _abort(context, "Migrate", _Refused(code, message))
        finally:
            if not ended:
                listening.clear()
                log.warning(
                    "Migrate %s: client %s went away; workflow %s continues without it "
                    "(its outcome will be logged and journalled)",
                    what,
                    _peer(context),
                    workflow_id or "(not yet begun)",
                )

    def GetStatus(self, request: Any, context: Any) -> Any:
        if not request.domain:
            _abort(
                context,
                "GetStatus",
                _Refused(grpc.StatusCode.INVALID_ARGUMENT, "GetStatusRequest.domain is required"),
            )
        uri = request.uri or DEFAULT_URI
        status = self._ask(
            context, "GetStatus", lambda: self._coordinator.status(uri, request.domain)
        )
        return self._encode(context, "GetStatus", lambda: status_message(status))

    def ListPools(self, request: Any, context: Any) -> Any:
        uri = request.uri or DEFAULT_URI
        pools = self._ask(context, "ListPools", lambda: self._coordinator.pools(uri))
        return self._encode(
            context,
            "ListPools",
            lambda: pb.ListPoolsResponse(pools=[pool_message(p) for p in pools]),
        )

    def Recover(self, request: Any, context: Any) -> Any:
        log.info("Recover requested by %s", _peer(context))
        results = self._ask(context, "Recover", self._coordinator.recover)
        for result in results:
            log.info("Recover: %s", _json(result))
        return self._encode(
            context,
            "Recover",
            lambda: pb.RecoverResponse(results=[recover_result(r) for r in results]),
        )

    def ListWorkflows(self, request: Any, context: Any) -> Any:
        limit = min(int(request.limit) or DEFAULT_LIST_LIMIT, MAX_LIST_LIMIT)
        records = self._ask(context, "ListWorkflows", lambda: self._coordinator.workflows(limit))
        return self._encode(
            context,
            "ListWorkflows",
            lambda: pb.ListWorkflowsResponse(workflows=[workflow_summary(r) for r in records]),
        )

    def Failover(self, request: Any, context: Any) -> Any:
        to = self._decode(context, "Failover", lambda: failover_target(request))
        log.info("Failover %s to %s requested by %s", request.domain, to, _peer(context))
        uri = request.uri or DEFAULT_URI
        result = self._ask(
            context, "Failover", lambda: self._coordinator.failover(uri, request.domain, to)
        )
        return self._encode(context, "Failover", lambda: failover_message(result))

    def GetTeams(self, request: Any, context: Any) -> Any:
        self._decode(context, "GetTeams", lambda: _required(request, "domain"))
        uri = request.uri or DEFAULT_URI
        teams = self._ask(
            context, "GetTeams", lambda: self._coordinator.team_show(uri, request.domain)
        )
        return self._encode(context, "GetTeams", lambda: teams_message(teams))

    def SetTeam(self, request: Any, context: Any) -> Any:
        team = self._decode(context, "SetTeam", lambda: team_request(request))
        log.info("SetTeam %s %s requested by %s", request.domain, team.name, _peer(context))
        uri = request.uri or DEFAULT_URI
        teams = self._ask(
            context, "SetTeam", lambda: self._coordinator.team_set(uri, request.domain, team)
        )
        return self._encode(context, "SetTeam", lambda: teams_message(teams))

    def RemoveTeam(self, request: Any, context: Any) -> Any:
        self._decode(context, "RemoveTeam", lambda: _required(request, "domain", "name"))
        log.info("RemoveTeam %s %s requested by %s", request.domain, request.name, _peer(context))
        uri = request.uri or DEFAULT_URI
        teams = self._ask(
            context,
            "RemoveTeam",
            lambda: self._coordinator.team_remove(uri, request.domain, request.name),
        )
        return self._encode(context, "RemoveTeam", lambda: teams_message(teams))

    def DefinePool(self, request: Any, context: Any) -> Any:
        pool = self._decode(context, "DefinePool", lambda: pool_definition(request))
        log.info("DefinePool %s (%s) requested by %s", pool.name, pool.kind, _peer(context))
        uri = request.uri or DEFAULT_URI
        status = self._ask(context, "DefinePool", lambda: self._coordinator.pool_define(uri, pool))
        return self._encode(context, "DefinePool", lambda: pool_message(status))

    def UndefinePool(self, request: Any, context: Any) -> Any:
        self._decode(context, "UndefinePool", lambda: _required(request, "name"))
        log.info("UndefinePool %s requested by %s", request.name, _peer(context))
        uri = request.uri or DEFAULT_URI
        self._ask(
            context, "UndefinePool", lambda: self._coordinator.pool_undefine(uri, request.name)
        )
        return pb.UndefinePoolResponse()

    @staticmethod
    def _decode(context: Any, method: str, decode: Callable[[], T]) -> T:
        """A request's fields as the Coordinator takes them; INVALID_ARGUMENT if they are not."""
        try:
            return decode()
        except ValueError as exc:
            error = _Refused(grpc.StatusCode.INVALID_ARGUMENT, _one_line(str(exc)))
        _abort(context, method, error)

    @staticmethod
    def _ask(context: Any, method: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except Exception as exc:
            _log_failure(method, exc)
            error = _Refused(*status_for(exc))
        _abort(context, method, error)

    @staticmethod
    def _encode(context: Any, method: str, build: Callable[[], Any]) -> Any:
        try:
            return build()
        except Exception as exc:  # the coordinator answered something we cannot encode
            log.error("%s: cannot encode the coordinator's answer", method, exc_info=exc)
            error = _Refused(grpc.StatusCode.INTERNAL, f"ptmigd cannot encode the answer: {exc}")
        _abort(context, method, error)


# -- the server ------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class ListenConfig:
    socket: Path = DEFAULT_SOCKET
    tcp: str | None = None  # HOST:PORT, only with tls
    tls: TlsFiles | None = None
    threads: int = RPC_THREADS

    def check(self) -> None:
        if self.tcp is not None and self.tls is None:
            raise ConfigError(
                f"refusing to listen on TCP {self.tcp} without mutual TLS: "
                "give --tls-cert, --tls-key and --tls-client-ca as well"
            )
        if self.tls is not None and self.tcp is None:
            raise ConfigError("TLS files are only used with --listen-tcp")
        if self.tcp is not None:
            host, sep, port = self.tcp.rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ConfigError(f"--listen-tcp {self.tcp!r} is not HOST:PORT")


@dataclass
class Daemon:
    """A started ptmigd server."""

    server: Any
    servicer: CoordinatorServicer
    socket: Path
    tcp_port: int | None = None

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Stop taking RPCs (running migrations go on; see :meth:`wait_for_workflows`)."""
        self.server.stop(grace).wait()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.socket).st_mode):
                os.unlink(self.socket)

    def wait_for_workflows(self, timeout: float | None = None) -> bool:
        return self.servicer.workers.join(timeout)


def check_socket_dir(directory: Path) -> None:
    """Create `directory` 0700 if missing; refuse it unless ours, a real dir and 0700."""
    if not os.path.lexists(directory):
        try:
            directory.mkdir(mode=0o700, parents=True)
            directory.chmod(0o700)
        except OSError as exc:
            raise ConfigError(f"cannot create socket directory {directory}: {exc}") from exc
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"socket directory {directory} is not a directory (or is a symlink)")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"socket directory {directory} is owned by uid {info.st_uid}, not by ptmigd's "
            f"uid {os.geteuid()}; refusing to start"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode != 0o700:
        raise ConfigError(
            f"socket directory {directory} has mode {mode:04o}; it must be 0700 "
            "(only ptmigd's user may reach the socket); refusing to start"
        )


def prepare_socket(path: Path) -> None:
    check_socket_dir(path.parent)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; not removing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # stale: nobody listens
        return
    finally:
        probe.close()
    raise ConfigError(f"another server is listening on {path}; is ptmigd already running?")


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


def serve(coordinator: Coordinator, config: ListenConfig) -> Daemon:
    """Start ptmigd's gRPC server as `config` says; ConfigError when it must not or cannot."""
    config.check()
    credentials = None
    if config.tls is not None:
        credentials = grpc.ssl_server_credentials(
            [(_read(config.tls.key, "TLS key"), _read(config.tls.cert, "TLS certificate"))],
            root_certificates=_read(config.tls.client_ca, "TLS client CA"),
            require_client_auth=True,
        )
    prepare_socket(config.socket)
    servicer = CoordinatorServicer(coordinator)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.threads, thread_name_prefix="rpc"),
        options=[("grpc.so_reuseport", 0)],  # a second ptmigd on the same port fails
    )
    pb_grpc.add_CoordinatorServicer_to_server(servicer, server)
    tcp_port = None
    with _umask(0o177):
        _bind(lambda: server.add_insecure_port(f"unix:{config.socket}"), str(config.socket))
        if config.tcp is not None:
            tcp_port = _bind(lambda: server.add_secure_port(config.tcp, credentials), config.tcp)
        server.start()
    os.chmod(config.socket, 0o600)
    log.info(
        "ptmigd listening on unix:%s%s",
        config.socket,
        f" and tcp {config.tcp} (port {tcp_port}, mutual TLS)" if tcp_port else "",
    )
    return Daemon(server, servicer, config.socket, tcp_port)


def _bind(add: Callable[[], int], where: str) -> int:
    try:
        port = add()
    except RuntimeError as exc:  # grpcio >= 1.53 raises, older return 0
        raise ConfigError(f"cannot listen on {where}: {exc}") from exc
    if not port:
        raise ConfigError(f"cannot listen on {where}")
    return port


# -- entry point -----------------------------------------------------------------------


def default_coordinator(journal: Path) -> Coordinator:
    """The workflow's Coordinator over the journal at `journal`."""
    from host.workflow.coordinator import Coordinator as WorkflowCoordinator
    from host.workflow.journal import Journal

    coordinator: Coordinator = WorkflowCoordinator(journal=Journal(journal))
    return coordinator


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="ptmigd",
        description="ptmig coordinator daemon: the Coordinator gRPC API for management layers",
    )
    parser.add_argument(
        "--socket",
        type=Path,
        default=DEFAULT_SOCKET,
        help="unix socket (0600, its directory 0700); default %(default)s",
    )
    parser.add_argument(
        "--journal",
        type=Path,
        default=DEFAULT_JOURNAL,
        help="workflow journal (SQLite); default %(default)s",
    )
    parser.add_argument(
        "--listen-tcp",
        metavar="HOST:PORT",
        help="also serve TCP, with mutual TLS only (needs the --tls-* files)",
    )
    parser.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    parser.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="CA certificate(s) that issue client certificates (PEM)"
    )
    parser.add_argument(
        "--reconcile",
        action="append",
        default=[],
        metavar="URI",
        help="repair degraded domains on this libvirt host when a device is free (repeat)",
    )
    parser.add_argument(
        "--reconcile-interval",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="least time between two passes over one host; default %(default)s",
    )
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more logging (-v: debug)"
    )
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> ListenConfig:
    tls_files = (args.tls_cert, args.tls_key, args.tls_client_ca)
    if any(tls_files) and not all(tls_files):
        raise ConfigError("--tls-cert, --tls-key and --tls-client-ca go together")
    tls = TlsFiles(*tls_files) if all(tls_files) else None
    config = ListenConfig(socket=args.socket, tcp=args.listen_tcp, tls=tls)
    config.check()
    return config


def main(argv: Sequence[str] | None = None, *, coordinator: Coordinator | None = None) -> int:
    """Run ptmigd until SIGTERM/SIGINT; then wait for running migrations.  Exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        config = config_from_args(args)
        if coordinator is None:
            coordinator = default_coordinator(args.journal)
        daemon = serve(coordinator, config)
    except (ConfigError, JournalError) as exc:
        print(f"ptmigd: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    reconciler = None
    if args.reconcile:
        from host.workflow.coordinator import Coordinator as WorkflowCoordinator
        from host.workflow.coordinator import Reconciler

        if not isinstance(coordinator, WorkflowCoordinator):
            print("ptmigd: --reconcile needs the workflow coordinator", file=sys.stderr)
            return 2
        reconciler = Reconciler(coordinator, args.reconcile, args.reconcile_interval)
        reconciler.start()
        log.info("reconciling %s every %.0f s", ", ".join(args.reconcile), args.reconcile_interval)
    try:
        while not stop.wait(3600):
            pass
        log.info("stopping: no new RPCs")
        if reconciler is not None:
            log.info("waiting for the reconciler's repair in progress, if any")
            reconciler.stop()
        daemon.stop()
        running = daemon.servicer.workers.running()
        if running:
            log.warning("waiting for %d running migration(s) to finish", len(running))
        daemon.wait_for_workflows()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
