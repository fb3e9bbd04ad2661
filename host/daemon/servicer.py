"""ptmig.v1.Coordinator over a :class:`Coordinator`: decode, one call, encode."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import grpc
from ptmig.v1 import coordinator_pb2 as pb

from host.daemon.encode import (
    cancel_message,
    cancel_wait,
    details_json,
    evacuation_event_message,
    evacuation_request,
    event_message,
    failover_message,
    failover_target,
    final_evacuation_event,
    final_event,
    migration_request,
    pool_definition,
    pool_message,
    recover_result,
    require,
    status_message,
    team_request,
    teams_message,
    workflow_summary,
)
from host.daemon.errors import Refused, abort, log_failure, one_line, peer_of, status_for
from host.domain.pools import Pool
from host.workflow.model import (
    CancelResult,
    DomainStatus,
    DomainTeams,
    EvacuationEvent,
    EvacuationReport,
    EvacuationRequest,
    Event,
    FailoverResult,
    MigrationReport,
    MigrationRequest,
    PoolStatus,
    RecoverResult,
    TeamMode,
    TeamRequest,
    WorkflowSummary,
)

log = logging.getLogger("ptmig.daemon")


class Coordinator(Protocol):
    """What ptmigd needs of the workflow (host.workflow.coordinator.Coordinator)."""

    def migrate(
        self, request: MigrationRequest, on_event: Callable[[Event], None]
    ) -> MigrationReport:
        """Run one migration to its end; `on_event` is called from the workflow's thread
        and, during the migration job, from the job's progress watcher
        (host/migration_job.py): the servicer queues them."""
        ...

    def evacuate(
        self,
        request: EvacuationRequest,
        on_event: Callable[[EvacuationEvent], None],
        interrupted: Callable[[], str],
    ) -> EvacuationReport:
        """Evacuate a host; `on_event` is called from its worker threads, one at a time."""
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

    def cancel(self, domain: str, *, requested_by: str = "", wait: float = ...) -> CancelResult: ...


DEFAULT_URI = "qemu:///system"

POLL_S = 0.5  # how often a waiting Migrate stream looks whether its client is still there
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 1000


T = TypeVar("T")


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
class _Evacuated:
    report: EvacuationReport


@dataclass(frozen=True)
class _Crashed:
    error: BaseException


class _Relay:
    """A streaming RPC's side of a worker thread: its events go out as they come, its
    end as the final message, its crash as the RPC's status.  ``ended`` stays False when
    the client went away first (the caller decides what the worker does then)."""

    def __init__(self) -> None:
        self.items: queue.Queue[Any] = queue.Queue()
        self.ended = False

    def messages(
        self,
        context: Any,
        method: str,
        event: Callable[[Any], Any],
        final: Callable[[Any], Any],
    ) -> Iterator[Any]:
        while True:
            try:
                item = self.items.get(timeout=POLL_S)
            except queue.Empty:
                if not context.is_active():
                    return
                continue
            if isinstance(item, _Crashed):
                self.ended = True
                code, message = status_for(item.error)
                abort(context, method, Refused(code, message))
            if isinstance(item, (_Finished, _Evacuated)):
                self.ended = True
                yield final(item.report)
                return
            yield event(item)


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
            abort(context, "Migrate", Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc)))
        what = f"{migration.domain} {migration.source_uri} -> {migration.destination_uri}"
        log.info("Migrate %s requested by %s", what, peer_of(context))
        relay = _Relay()
        listening = threading.Event()
        listening.set()
        workflow_ids: list[str] = []  # the first event's, for the log line if the client goes

        def on_event(event: Event) -> None:
            if listening.is_set():
                workflow_ids.append(event.workflow_id)
                relay.items.put(event)

        def run() -> None:
            try:
                report = self._coordinator.migrate(migration, on_event)
            except BaseException as exc:
                if listening.is_set():
                    relay.items.put(_Crashed(exc))
                log_failure(f"Migrate {what}", exc)
                return
            relay.items.put(_Finished(report))
            log.info(
                "Migrate %s: workflow %s ended %s%s",
                what,
                report.workflow_id,
                report.outcome,
                f" ({report.error})" if report.error else "",
            )

        self.workers.start(run, name=f"migrate {migration.domain}")
        try:
            yield from relay.messages(context, "Migrate", event_message, final_event)
        finally:
            if not relay.ended:
                listening.clear()
                log.warning(
                    "Migrate %s: client %s went away; workflow %s continues without it "
                    "(its outcome will be logged and journalled)",
                    what,
                    peer_of(context),
                    next((w for w in workflow_ids if w), "(not yet begun)"),
                )

    def Evacuate(self, request: Any, context: Any) -> Iterator[Any]:
        evacuation = self._decode(context, "Evacuate", lambda: evacuation_request(request))
        what = f"{evacuation.source_uri} -> {', '.join(t.uri for t in evacuation.targets)}"
        log.info("Evacuate %s requested by %s", what, peer_of(context))
        relay = _Relay()
        gone = threading.Event()  # the client cancelled or went away: stop the evacuation
        reason = f"the Evacuate client {peer_of(context)} went away"
        context.add_callback(gone.set)  # called when the RPC ends, however it ends

        def interrupted() -> str:
            return reason if gone.is_set() else ""

        def run() -> None:
            try:
                report = self._coordinator.evacuate(evacuation, relay.items.put, interrupted)
            except BaseException as exc:
                relay.items.put(_Crashed(exc))
                log_failure(f"Evacuate {what}", exc)
                return
            relay.items.put(_Evacuated(report))
            log.info(
                "Evacuate %s: %s",
                what,
                ", ".join(f"{d.domain} {d.outcome}" for d in report.domains) or "no domains",
            )

        self.workers.start(run, name=f"evacuate {evacuation.source_uri}")
        try:
            yield from relay.messages(
                context, "Evacuate", evacuation_event_message, final_evacuation_event
            )
        finally:
            if not relay.ended:
                gone.set()
                log.warning(
                    "Evacuate %s: %s; no new migration starts, the running ones are cancelled",
                    what,
                    reason,
                )

    def GetStatus(self, request: Any, context: Any) -> Any:
        if not request.domain:
            abort(
                context,
                "GetStatus",
                Refused(grpc.StatusCode.INVALID_ARGUMENT, "GetStatusRequest.domain is required"),
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
        log.info("Recover requested by %s", peer_of(context))
        results = self._ask(context, "Recover", self._coordinator.recover)
        for result in results:
            log.info("Recover: %s", details_json(result))
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
        log.info("Failover %s to %s requested by %s", request.domain, to, peer_of(context))
        uri = request.uri or DEFAULT_URI
        result = self._ask(
            context, "Failover", lambda: self._coordinator.failover(uri, request.domain, to)
        )
        return self._encode(context, "Failover", lambda: failover_message(result))

    def GetTeams(self, request: Any, context: Any) -> Any:
        self._decode(context, "GetTeams", lambda: require(request, "domain"))
        uri = request.uri or DEFAULT_URI
        teams = self._ask(
            context, "GetTeams", lambda: self._coordinator.team_show(uri, request.domain)
        )
        return self._encode(context, "GetTeams", lambda: teams_message(teams))

    def SetTeam(self, request: Any, context: Any) -> Any:
        team = self._decode(context, "SetTeam", lambda: team_request(request))
        log.info("SetTeam %s %s requested by %s", request.domain, team.name, peer_of(context))
        uri = request.uri or DEFAULT_URI
        teams = self._ask(
            context, "SetTeam", lambda: self._coordinator.team_set(uri, request.domain, team)
        )
        return self._encode(context, "SetTeam", lambda: teams_message(teams))

    def RemoveTeam(self, request: Any, context: Any) -> Any:
        self._decode(context, "RemoveTeam", lambda: require(request, "domain", "name"))
        log.info("RemoveTeam %s %s requested by %s", request.domain, request.name, peer_of(context))
        uri = request.uri or DEFAULT_URI
        teams = self._ask(
            context,
            "RemoveTeam",
            lambda: self._coordinator.team_remove(uri, request.domain, request.name),
        )
        return self._encode(context, "RemoveTeam", lambda: teams_message(teams))

    def DefinePool(self, request: Any, context: Any) -> Any:
        pool = self._decode(context, "DefinePool", lambda: pool_definition(request))
        log.info("DefinePool %s (%s) requested by %s", pool.name, pool.kind, peer_of(context))
        uri = request.uri or DEFAULT_URI
        status = self._ask(context, "DefinePool", lambda: self._coordinator.pool_define(uri, pool))
        return self._encode(context, "DefinePool", lambda: pool_message(status))

    def UndefinePool(self, request: Any, context: Any) -> Any:
        self._decode(context, "UndefinePool", lambda: require(request, "name"))
        log.info("UndefinePool %s requested by %s", request.name, peer_of(context))
        uri = request.uri or DEFAULT_URI
        self._ask(
            context, "UndefinePool", lambda: self._coordinator.pool_undefine(uri, request.name)
        )
        return pb.UndefinePoolResponse()

    def Cancel(self, request: Any, context: Any) -> Any:
        self._decode(context, "Cancel", lambda: require(request, "domain"))
        wait = self._decode(context, "Cancel", lambda: cancel_wait(request))
        who = f"the Cancel RPC from {peer_of(context)}"
        log.info("Cancel %s requested by %s", request.domain, peer_of(context))
        result = self._ask(
            context,
            "Cancel",
            lambda: self._coordinator.cancel(request.domain, requested_by=who, wait=wait),
        )
        log.info("Cancel %s: %s", request.domain, result.message)
        return self._encode(context, "Cancel", lambda: cancel_message(result))

    @staticmethod
    def _decode(context: Any, method: str, decode: Callable[[], T]) -> T:
        """A request's fields as the Coordinator takes them; INVALID_ARGUMENT if they are not."""
        try:
            return decode()
        except ValueError as exc:
            error = Refused(grpc.StatusCode.INVALID_ARGUMENT, one_line(str(exc)))
        abort(context, method, error)

    @staticmethod
    def _ask(context: Any, method: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except Exception as exc:
            log_failure(method, exc)
            error = Refused(*status_for(exc))
        abort(context, method, error)

    @staticmethod
    def _encode(context: Any, method: str, build: Callable[[], Any]) -> Any:
        try:
            return build()
        except Exception as exc:  # the coordinator answered something we cannot encode
            log.error("%s: cannot encode the coordinator's answer", method, exc_info=exc)
            error = Refused(grpc.StatusCode.INTERNAL, f"ptmigd cannot encode the answer: {exc}")
        abort(context, method, error)
