"""The Evacuate RPC over the real Coordinator on the in-memory world, through a real gRPC
server on a unix socket: the stream's events and summary, its refusals, and a client
that cancels the stream stopping the evacuation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from ptmig.v1 import coordinator_pb2 as pb
from ptmig.v1 import coordinator_pb2_grpc as pb_grpc
from workflow_fakes import VM1, VM2, A, B, C, World, numbered_guest

from host.daemon import ListenConfig, serve
from host.workflow.journal import Journal

CALL_TIMEOUT = 30


@pytest.fixture
def world() -> World:
    return World((VM1, VM2), hosts=(A, B, C))


@pytest.fixture
def daemon(world: World, journal_path: Path, short_tmp: Path) -> Iterator[Any]:
    with Journal(journal_path) as journal:
        d = serve(
            world.coordinator(journal),
            ListenConfig(socket=short_tmp / "run" / "ptmigd.sock", threads=4),
        )
        try:
            yield d
        finally:
            d.stop(grace=1)
            assert d.wait_for_workflows(timeout=CALL_TIMEOUT)


@pytest.fixture
def stub(daemon: Any) -> Iterator[Any]:
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        yield pb_grpc.CoordinatorStub(channel)


def request(*targets: str, **kw: Any) -> Any:
    return pb.EvacuateRequest(
        source_uri=A, targets=[pb.EvacuationTarget(uri=t) for t in targets], **kw
    )


def test_evacuate_streams_each_domain_and_ends_with_the_summary(stub: Any, world: World) -> None:
    events = list(stub.Evacuate(request(B, C, parallel=2), timeout=CALL_TIMEOUT))
    *steps, last = events
    assert (last.phase, last.state, last.message) == ("report", "ended", "2 done")
    report = last.report
    assert (report.source_uri, report.parallel) == (A, 2) and report.wall_s > 0
    got = {d.domain: d for d in report.domains}
    assert list(got) == ["vm1", "vm2"]
    vm1 = got["vm1"]
    assert (vm1.uuid, vm1.destination_uri, vm1.outcome, vm1.error) == (VM1.uuid, B, "done", "")
    assert vm1.started_at > 0 and vm1.seconds > 0
    assert (vm1.report.outcome, vm1.report.outcome_text, vm1.report.domain) == (
        pb.OUTCOME_DONE,
        "done",
        "vm1",
    )
    assert [p.name for p in vm1.report.phases] == [
        "preflight",
        "switch",
        "unplug",
        "migrate",
        "bind",
    ]
    assert got["vm2"].destination_uri == C and world.running_on("vm2") == [C]
    assert not any(s.HasField("report") for s in steps)
    vm1_steps = [(s.phase, s.state, s.outcome) for s in steps if s.domain == "vm1"]
    assert vm1_steps[0] == ("queued", "info", "")
    assert vm1_steps[-1] == ("result", "done", "done")
    migrate = next(s for s in steps if s.domain == "vm1" and s.phase == "migrate")
    assert migrate.destination_uri == B and migrate.workflow_id == vm1.report.workflow_id


def test_skipped_domains_have_no_report(stub: Any, world: World) -> None:
    world.add_guest(numbered_guest(1, teams=0))
    *_, last = stub.Evacuate(request(B), timeout=CALL_TIMEOUT)
    skipped = next(d for d in last.report.domains if d.domain == "g00001")
    assert (skipped.outcome, skipped.destination_uri, skipped.HasField("report")) == (
        "skipped",
        "",
        False,
    )


@pytest.mark.parametrize(
    "bad",
    [request(), request(A), request(B, B), pb.EvacuateRequest(targets=[pb.EvacuationTarget()])],
)
def test_requests_that_cannot_run_are_invalid(stub: Any, world: World, bad: Any) -> None:
    before = world.snapshot()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Evacuate(bad, timeout=CALL_TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert world.snapshot() == before


def test_no_reachable_target_is_unavailable(stub: Any, world: World) -> None:
    del world.hosts[C]
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Evacuate(request(C), timeout=CALL_TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no target could be reached" in (caught.value.details() or "")


def test_a_client_cancelling_the_stream_stops_the_evacuation(
    journal_path: Path, short_tmp: Path
) -> None:
    world = World(tuple(numbered_guest(n) for n in range(3)), slots={A: 3, B: 3})
    world.migration_job_s = 20.0  # until aborted
    with Journal(journal_path) as journal:
        daemon = serve(
            world.coordinator(journal),
            ListenConfig(socket=short_tmp / "run" / "ptmigd.sock", threads=4),
        )
        try:
            with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
                stream = pb_grpc.CoordinatorStub(channel).Evacuate(
                    request(B, parallel=1), timeout=CALL_TIMEOUT
                )
                for event in stream:
                    if (event.domain, event.phase, event.state) == ("g00000", "migrate", "started"):
                        break
                began = time.monotonic()
                stream.cancel()
            assert daemon.wait_for_workflows(timeout=CALL_TIMEOUT)
            assert time.monotonic() - began < 10  # the job was aborted, not waited for
        finally:
            daemon.stop(grace=1)
        rows = journal.recent()
    assert [(w.domain_name, w.outcome, (w.report or {}).get("cancelled")) for w in rows] == [
        ("g00000", "rolled-back", True)
    ]  # the others never began
    assert all(world.running_on(f"g{n:05d}") == [A] for n in range(3))
