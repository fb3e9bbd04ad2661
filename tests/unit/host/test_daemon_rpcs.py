"""Every ptmigd RPC over the real Coordinator on the in-memory two-host world, through a
real gRPC server on a unix socket: each test asserts every field of its answer."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from ptmig.v1 import coordinator_pb2 as pb
from ptmig.v1 import guest_agent_pb2 as agent_pb
from workflow_fakes import VM1, A, B, Events, World, crash, crash_in_child
from world_daemon import world_ptmigd

from host.workflow.journal import Journal
from host.workflow.model import MigrationRequest

CALL_TIMEOUT = 30
REQUEST = MigrationRequest("vm1", A, B)


@contextmanager
def ptmigd(world: World, journal_path: Path, short_tmp: Path) -> Iterator[Any]:
    """A stub of a ptmigd serving the world's Coordinator."""
    with world_ptmigd(world, journal_path, short_tmp) as (stub, _journal):
        yield stub


@pytest.fixture
def stub(world: World, journal_path: Path, short_tmp: Path) -> Iterator[Any]:
    with ptmigd(world, journal_path, short_tmp) as s:
        yield s


def migrate(stub: Any) -> list[Any]:
    request = pb.MigrateRequest(domain="vm1", source_uri=A, destination_uri=B)
    return list(stub.Migrate(request, timeout=CALL_TIMEOUT))


def test_migrate(stub: Any, world: World) -> None:
    *events, last = migrate(stub)

    (workflow_id,) = {e.workflow_id for e in events}
    assert [(e.phase, e.state) for e in events if e.state != "progress"][:2] == [
        ("preflight", "started"),
        ("preflight", "done"),
    ]
    assert all(e.at > 0 and not e.HasField("report") for e in events)
    assert all(0 <= e.fraction <= 1 for e in events if e.HasField("fraction"))
    assert (last.workflow_id, last.phase, last.state) == (workflow_id, "report", "done")
    assert last.message == "vm1: done" and last.at > 0
    report = last.report
    assert (report.workflow_id, report.domain, report.source_uri, report.destination_uri) == (
        workflow_id,
        "vm1",
        A,
        B,
    )
    assert (report.outcome, report.outcome_text, report.error) == (pb.OUTCOME_DONE, "done", "")
    assert [p.name for p in report.phases] == ["preflight", "switch", "unplug", "migrate", "bind"]
    assert all(p.seconds >= 0 for p in report.phases)
    assert next(p.detail for p in report.phases if p.name == "preflight")
    assert dict(report.teams) == {"lan": "primary", "wan": "primary"}
    migration = json.loads(report.migration_json)
    assert {k: migration[k] for k in ("wall_s", "downtime_ms", "elapsed_ms", "data_total")} == {
        "wall_s": 0.2,
        "downtime_ms": 42,
        "elapsed_ms": 1800,
        "data_total": 2**29,
    }
    assert (migration["tls"], migration["postcopy"], migration["copy_storage"]) == (
        False,
        False,
        "",
    )
    assert world.running_on("vm1") == [B]


def test_get_status(stub: Any) -> None:
    reply = stub.GetStatus(pb.GetStatusRequest(uri=A, domain="vm1"), timeout=CALL_TIMEOUT)

    assert (reply.domain, reply.uuid, reply.uri) == ("vm1", VM1.uuid, A)
    assert (reply.open_workflow_id, reply.agent_error) == ("", "")
    lan, wan = reply.teams
    assert (lan.name, lan.mode, lan.mode_text) == ("lan", pb.TEAM_MODE_PRIMARY, "primary")
    assert (lan.pool, lan.mac_policy, lan.detail, lan.drift) == ("lab", "preserve", "", "")
    assert (lan.active_member, list(lan.members)) == ("enp3s0", ["enp1s0", "enp3s0"])
    assert (lan.primary.kind, lan.primary.alias, lan.primary.tap) == (
        "emulated",
        "ua-ptmig-lan-1",
        "ptv-a1",
    )
    assert (lan.primary.mac, lan.primary.pci_address, lan.primary.network) == (
        "52:54:00:ba:00:01",
        "",
        "",
    )
    assert (wan.name, wan.mode, wan.mac_policy, wan.primary.tap) == (
        "wan",
        pb.TEAM_MODE_PRIMARY,
        "follow",
        "ptv-a2",
    )
    details = json.loads(reply.details_json)
    assert details["teams"][0]["primary"]["tap"] == "ptv-a1"
    assert details["uuid"] == VM1.uuid


def test_get_status_carries_what_a_guest_managed_team_did(world: World, stub: Any) -> None:
    lost = agent_pb.TeamEvent(
        kind="primary-lost", device="enp3s0", reason="enp3s0 removed", ok=True, unix_ms=7
    )
    world.guest("vm1").teams["lan"].managed_by_guest = True
    world.guest("vm1").teams["lan"].last_event = lost
    reply = stub.GetStatus(pb.GetStatusRequest(uri=A, domain="vm1"), timeout=CALL_TIMEOUT)
    lan, wan = reply.teams
    assert lan.managed_by_guest and not wan.managed_by_guest
    assert lan.last_event.SerializeToString() == lost.SerializeToString()  # field by field
    assert not wan.HasField("last_event")
    assert json.loads(reply.details_json)["teams"][0]["last_event"]["kind"] == "primary-lost"


def test_get_status_names_the_open_workflow_and_a_silent_agent(
    world: World, journal_path: Path, short_tmp: Path
) -> None:
    crash_in_child(
        world, journal_path, lambda c: c.migrate(REQUEST, Events({("unplug", "started"): crash}))
    )
    world.guest("vm1").agent_up = False
    with Journal(journal_path) as journal:
        (left,) = journal.open_workflows()
    with ptmigd(world, journal_path, short_tmp) as stub:
        reply = stub.GetStatus(pb.GetStatusRequest(uri=A, domain=VM1.uuid), timeout=CALL_TIMEOUT)
    assert reply.open_workflow_id == left.id
    assert "UNAVAILABLE" in reply.agent_error
    assert [(t.mode, t.mode_text) for t in reply.teams] == [
        (pb.TEAM_MODE_UNSPECIFIED, "unknown")
    ] * 2
    assert all(t.detail == f"guest agent: {reply.agent_error}" for t in reply.teams)
    assert all(t.active_member == "" and not t.members for t in reply.teams)


def test_list_pools(stub: Any, world: World) -> None:
    (pool,) = stub.ListPools(pb.ListPoolsRequest(uri=B), timeout=CALL_TIMEOUT).pools
    assert (pool.name, pool.kind, pool.total, pool.free, pool.error) == (
        "lab",
        "emulated",
        4,
        4,
        "",
    )
    assert list(pool.free_devices) == ["ptv-b1", "ptv-b2", "ptv-b3", "ptv-b4"]
    assert json.loads(pool.details_json)["free_devices"] == list(pool.free_devices)

    migrate(stub)
    (pool,) = stub.ListPools(pb.ListPoolsRequest(uri=B), timeout=CALL_TIMEOUT).pools
    assert (pool.total, pool.free, list(pool.free_devices)) == (4, 2, ["ptv-b3", "ptv-b4"])


def test_recover(world: World, journal_path: Path, short_tmp: Path) -> None:
    crash_in_child(
        world, journal_path, lambda c: c.migrate(REQUEST, Events({("unplug", "started"): crash}))
    )
    with Journal(journal_path) as journal:
        (left,) = journal.open_workflows()
    with ptmigd(world, journal_path, short_tmp) as stub:
        (result,) = stub.Recover(pb.RecoverRequest(), timeout=CALL_TIMEOUT).results
        assert stub.Recover(pb.RecoverRequest(), timeout=CALL_TIMEOUT).results == []

    assert (result.workflow_id, result.domain, result.action) == (left.id, "vm1", "rolled-back")
    assert (result.outcome, result.outcome_text, result.error) == (
        pb.OUTCOME_ROLLED_BACK,
        "rolled-back",
        "",
    )
    assert result.detail.startswith("on the source; teams ")
    assert json.loads(result.details_json)["detail"] == result.detail


def test_list_workflows(stub: Any) -> None:
    (*_, last) = migrate(stub)
    reply = stub.ListWorkflows(pb.ListWorkflowsRequest(limit=1000), timeout=CALL_TIMEOUT)

    row = reply.workflows[-1]
    assert (row.id, row.kind, row.domain_uuid, row.domain_name) == (
        last.workflow_id,
        "migrate",
        VM1.uuid,
        "vm1",
    )
    assert (row.source_uri, row.destination_uri, row.state) == (A, B, "closed")
    assert (row.outcome, row.outcome_text, row.owner_alive) == (pb.OUTCOME_DONE, "done", True)
    assert 0 < row.created <= row.updated
    assert json.loads(row.report_json)["teams"] == {"lan": "primary", "wan": "primary"}
    (newest,) = stub.ListWorkflows(pb.ListWorkflowsRequest(limit=1), timeout=CALL_TIMEOUT).workflows
    assert newest == reply.workflows[0]


def test_failover(stub: Any, world: World) -> None:
    reply = stub.Failover(
        pb.FailoverRequest(uri=A, domain="vm1", to=pb.TEAM_MODE_STANDBY), timeout=CALL_TIMEOUT
    )
    assert (reply.domain, reply.to, dict(reply.teams)) == (
        "vm1",
        pb.TEAM_MODE_STANDBY,
        {"lan": "standby", "wan": "standby"},
    )
    assert world.modes("vm1") == {"lan": "standby", "wan": "standby"}
    (row,) = stub.ListWorkflows(pb.ListWorkflowsRequest(limit=1), timeout=CALL_TIMEOUT).workflows
    assert (row.id, row.kind, row.outcome_text) == (reply.workflow_id, "failover", "done")

    with pytest.raises(grpc.RpcError) as caught:
        stub.Failover(
            pb.FailoverRequest(uri=A, domain="vm1", to=pb.TEAM_MODE_DEGRADED), timeout=CALL_TIMEOUT
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert world.modes("vm1") == {"lan": "standby", "wan": "standby"}


def test_get_teams(stub: Any) -> None:
    reply = stub.GetTeams(pb.GetTeamsRequest(uri=A, domain="vm1"), timeout=CALL_TIMEOUT)
    assert (reply.domain, reply.uuid) == ("vm1", VM1.uuid)
    lan, wan = reply.teams
    assert (lan.name, lan.standby_mac, lan.pool, lan.mac_policy, lan.team_mac) == (
        "lan",
        VM1.teams[0].standby_mac,
        "lab",
        "preserve",
        VM1.teams[0].team_mac,
    )
    assert lan.team_mac == "52:54:00:aa:00:01"
    assert (lan.primary.kind, lan.primary.alias, lan.primary.tap, lan.primary.mac) == (
        "emulated",
        "ua-ptmig-lan-1",
        "ptv-a1",
        "52:54:00:ba:00:01",
    )
    assert (wan.name, wan.mac_policy, wan.primary.tap) == ("wan", "follow", "ptv-a2")


def test_set_and_remove_a_team_are_journaled(stub: Any, world: World) -> None:
    reply = stub.SetTeam(
        pb.SetTeamRequest(
            uri=A,
            domain="vm1",
            name="lan",
            standby_mac="52:54:00:00:0A:01",
            pool="lab",
            mac_policy="follow",
            team_mac="52:54:00:00:0b:01",
            primary_alias="ua-ptmig-lan-1",
        ),
        timeout=CALL_TIMEOUT,
    )
    lan = next(t for t in reply.teams if t.name == "lan")
    assert (lan.standby_mac, lan.mac_policy, lan.team_mac) == (
        "52:54:00:00:0a:01",
        "follow",
        "52:54:00:00:0b:01",
    )
    assert (lan.primary.kind, lan.primary.tap) == ("emulated", "ptv-a1")
    shown = stub.GetTeams(pb.GetTeamsRequest(uri=A, domain="vm1"), timeout=CALL_TIMEOUT)
    assert shown == reply

    reply = stub.RemoveTeam(
        pb.RemoveTeamRequest(uri=A, domain="vm1", name="wan"), timeout=CALL_TIMEOUT
    )
    assert [t.name for t in reply.teams] == ["lan"]
    rows = stub.ListWorkflows(pb.ListWorkflowsRequest(), timeout=CALL_TIMEOUT).workflows
    assert [(r.kind, r.domain_uuid, r.outcome_text) for r in rows] == [
        ("team-remove", VM1.uuid, "done"),
        ("team-set", VM1.uuid, "done"),
    ]
    assert json.loads(rows[1].report_json) == {}


@pytest.mark.parametrize(
    ("call", "request_", "code"),
    [
        (
            "RemoveTeam",
            pb.RemoveTeamRequest(uri=A, domain="vm1", name="dmz"),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            "SetTeam",
            pb.SetTeamRequest(uri=A, domain="vm1", name="lan", standby_mac="nope", pool="lab"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "SetTeam",
            pb.SetTeamRequest(
                uri=A,
                domain="vm1",
                name="lan",
                standby_mac="52:54:00:0:0:1",
                pool="lab",
                primary_alias="ua-gone",
            ),
            grpc.StatusCode.NOT_FOUND,
        ),
        (
            "SetTeam",
            pb.SetTeamRequest(uri=A, domain="vm1", name="lan"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "DefinePool",
            pb.DefinePoolRequest(uri=A, name="p", kind="pci", bridge="br0"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            "DefinePool",
            pb.DefinePoolRequest(uri=A, name="p", kind="vf"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        ("UndefinePool", pb.UndefinePoolRequest(uri=A, name="nope"), grpc.StatusCode.NOT_FOUND),
    ],
)
def test_bad_configuration_requests_change_nothing(
    stub: Any, world: World, call: str, request_: Any, code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub, call)(request_, timeout=CALL_TIMEOUT)
    assert caught.value.code() == code
    assert "\n" not in caught.value.details()
    assert world.mutations() == []
    assert stub.ListWorkflows(pb.ListWorkflowsRequest(), timeout=CALL_TIMEOUT).workflows == []


def test_define_list_and_undefine_pools(stub: Any, world: World) -> None:
    pci = stub.DefinePool(
        pb.DefinePoolRequest(
            uri=B, name="nics", kind="pci", addresses=["0000:3b:00.0", "0000:3b:00.1"]
        ),
        timeout=CALL_TIMEOUT,
    )
    assert (pci.name, pci.kind, pci.total, pci.free, pci.error) == ("nics", "pci", 2, 2, "")
    assert list(pci.free_devices) == ["0000:3b:00.0", "0000:3b:00.1"]
    emulated = stub.DefinePool(
        pb.DefinePoolRequest(
            uri=B,
            name="lab",
            kind="emulated",
            bridge="br-g",
            slots=[pb.TapSlot(tap="ptv-b9", mac="52:54:00:cb:00:09")],
        ),
        timeout=CALL_TIMEOUT,
    )
    assert (emulated.kind, emulated.total, list(emulated.free_devices)) == (
        "emulated",
        1,
        ["ptv-b9"],
    )
    vf = stub.DefinePool(
        pb.DefinePoolRequest(
            uri=B, name="vfs", kind="vf-network", vf_addresses=["0000:5e:02.0", "0000:5e:02.1"]
        ),
        timeout=CALL_TIMEOUT,
    )
    assert (vf.kind, vf.total, vf.free, list(vf.free_devices)) == ("vf-network", 2, 2, [])
    listed = stub.ListPools(pb.ListPoolsRequest(uri=B), timeout=CALL_TIMEOUT).pools
    assert [p.name for p in listed] == ["lab", "nics", "vfs"]
    assert listed[1] == pci

    stub.UndefinePool(pb.UndefinePoolRequest(uri=B, name="nics"), timeout=CALL_TIMEOUT)
    listed = stub.ListPools(pb.ListPoolsRequest(uri=B), timeout=CALL_TIMEOUT).pools
    assert [p.name for p in listed] == ["lab", "vfs"]
    rows = stub.ListWorkflows(pb.ListWorkflowsRequest(), timeout=CALL_TIMEOUT).workflows
    assert [(r.kind, r.domain_uuid, r.domain_name, r.outcome_text) for r in rows] == [
        ("pool-undefine", f"pool nics@{B}", "nics", "done"),
        ("pool-define", f"pool vfs@{B}", "vfs", "done"),
        ("pool-define", f"pool lab@{B}", "lab", "done"),
        ("pool-define", f"pool nics@{B}", "nics", "done"),
    ]


def test_cancel_without_a_running_migration_is_not_found(stub: Any, world: World) -> None:
    before = world.snapshot()
    with pytest.raises(grpc.RpcError) as raised:
        stub.Cancel(pb.CancelRequest(domain="vm1"), timeout=CALL_TIMEOUT)
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "vm1 has no running workflow" in raised.value.details()
    with pytest.raises(grpc.RpcError) as bad:
        stub.Cancel(pb.CancelRequest(domain="vm1", wait_seconds=-1), timeout=CALL_TIMEOUT)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert world.snapshot() == before


def test_cancel_rolls_a_running_migration_back(stub: Any, world: World) -> None:
    world.migration_job_s = 20.0
    request = pb.MigrateRequest(domain="vm1", source_uri=A, destination_uri=B)
    stream = stub.Migrate(request, timeout=CALL_TIMEOUT)
    for event in stream:
        if (event.phase, event.state) == ("migrate", "started"):
            break
    answer = stub.Cancel(pb.CancelRequest(domain="vm1", wait_seconds=15), timeout=CALL_TIMEOUT)
    *_, last = list(stream)
    assert (answer.accepted, answer.ended, answer.cancelled) == (True, True, True)
    assert (answer.outcome, answer.outcome_text, answer.domain) == (
        pb.OUTCOME_ROLLED_BACK,
        "rolled-back",
        "vm1",
    )
    assert answer.phase in ("migrate", "unplug") and answer.workflow_id == last.workflow_id
    assert (last.report.outcome, last.report.cancelled) == (pb.OUTCOME_ROLLED_BACK, True)
    assert world.running_on("vm1") == [A]
