"""The error contract of ptmigd: every RPC of ptmig.v1.Coordinator with bad input, over a
real gRPC server on a unix socket, to the real servicer and Coordinator on the in-memory
two-host world (the fake libvirt translates its errors with host.hypervisor's own
``libvirt_error``).  Each call is answered with the status that names the mistake, in
one line that is not an internal error, and nothing changed: the domains' live and
persistent XML (team metadata and leases included), the guests' teams, the hosts'
networks, no call that mutates a host or guest, and every row of the journal.

A request that is well formed but refused by the state of the domain or guest
(``records``) leaves one closed journal record of the refusal, as the journal records
every workflow it began, and may have asked the guest's agent, which did not answer;
nothing else changed.  Recover and ListWorkflows take nothing a
caller can get wrong (no field, a limit that is capped): they are called and must change
nothing either."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from ptmig.v1 import coordinator_pb2 as pb
from workflow_fakes import VM1, A, B, World
from world_daemon import CALL_TIMEOUT, world_ptmigd

from host.workflow.journal import Journal

C = "fake://c"  # no such host: unreachable
BAD_URI = "fake:// a"  # libvirt cannot parse it
OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
REFUSED = grpc.StatusCode.FAILED_PRECONDITION
BUSY = grpc.StatusCode.ALREADY_EXISTS
UNREACHABLE = grpc.StatusCode.UNAVAILABLE


def busy(world: World, journal: Journal) -> None:
    """Another coordinator's migration of vm1 is open in the journal."""
    journal.begin("migrate", VM1.uuid, "vm1", A, B, {})


def agent_down(world: World, journal: Journal) -> None:
    world.guest("vm1").agent_up = False


@dataclass(frozen=True)
class Case:
    rpc: str
    name: str
    request: Any
    code: grpc.StatusCode
    setup: Callable[[World, Journal], None] | None = None
    records: bool = False  # a refusal by state: one closed journal record of it

    def __str__(self) -> str:
        return f"{self.rpc}-{self.name}"


def migrate(**fields: Any) -> Any:
    return pb.MigrateRequest(**{"domain": "vm1", "source_uri": A, "destination_uri": B, **fields})


def evacuate(source: str, *targets: str) -> Any:
    return pb.EvacuateRequest(
        source_uri=source, targets=[pb.EvacuationTarget(uri=t) for t in targets]
    )


def failover(**fields: Any) -> Any:
    return pb.FailoverRequest(**{"uri": A, "domain": "vm1", "to": pb.TEAM_MODE_STANDBY, **fields})


def set_team(**fields: Any) -> Any:
    team = {"uri": A, "domain": "vm1", "name": "lan", "standby_mac": "52:54:00:00:01:01"}
    return pb.SetTeamRequest(**{**team, "pool": "lab", **fields})


def define_pool(**fields: Any) -> Any:
    pool = {"uri": A, "name": "nics", "kind": "pci", "addresses": ["0000:3b:00.0"]}
    return pb.DefinePoolRequest(**{**pool, **fields})


CASES = [
    Case("Migrate", "no-domain", migrate(domain=""), INVALID),
    Case("Migrate", "unknown-domain", migrate(domain="nope"), NOT_FOUND),
    Case("Migrate", "malformed-uri", migrate(source_uri=BAD_URI), INVALID),
    Case("Migrate", "unreachable-destination", migrate(destination_uri=C), UNREACHABLE),
    Case(
        "Migrate",
        "contradictory-options",
        migrate(options=pb.MigrationOptions(migrate_disks=["vdb"])),
        INVALID,
    ),
    Case("Migrate", "held-by-another-workflow", migrate(), BUSY, setup=busy),
    Case("Migrate", "same-host", migrate(destination_uri=A), REFUSED, records=True),
    Case("Migrate", "agent-down", migrate(), REFUSED, setup=agent_down, records=True),
    Case("Evacuate", "no-target", evacuate(A), INVALID),
    Case("Evacuate", "source-as-target", evacuate(A, A, B), INVALID),
    Case("Evacuate", "malformed-uri", evacuate(BAD_URI, B), INVALID),
    Case("Evacuate", "unreachable-source", evacuate(C, B), UNREACHABLE),
    Case("Evacuate", "unreachable-targets", evacuate(A, C), UNREACHABLE),
    Case("GetStatus", "no-domain", pb.GetStatusRequest(uri=A), INVALID),
    Case("GetStatus", "unknown-domain", pb.GetStatusRequest(uri=A, domain="nope"), NOT_FOUND),
    Case("GetStatus", "malformed-uri", pb.GetStatusRequest(uri=BAD_URI, domain="vm1"), INVALID),
    Case("GetStatus", "unreachable", pb.GetStatusRequest(uri=C, domain="vm1"), UNREACHABLE),
    Case("ListPools", "malformed-uri", pb.ListPoolsRequest(uri=BAD_URI), INVALID),
    Case("ListPools", "unreachable", pb.ListPoolsRequest(uri=C), UNREACHABLE),
    Case("Recover", "nothing-to-recover", pb.RecoverRequest(), OK),
    Case("ListWorkflows", "limit-above-the-cap", pb.ListWorkflowsRequest(limit=2**32 - 1), OK),
    Case("Failover", "no-domain", failover(domain=""), INVALID),
    Case("Failover", "no-mode", failover(to=pb.TEAM_MODE_UNSPECIFIED), INVALID),
    Case("Failover", "degraded-is-no-target", failover(to=pb.TEAM_MODE_DEGRADED), INVALID),
    Case("Failover", "unknown-domain", failover(domain="nope"), NOT_FOUND),
    Case("Failover", "unreachable", failover(uri=C), UNREACHABLE),
    Case("Failover", "held-by-another-workflow", failover(), BUSY, setup=busy),
    Case("Failover", "agent-down", failover(), UNREACHABLE, setup=agent_down, records=True),
    Case("GetTeams", "no-domain", pb.GetTeamsRequest(uri=A), INVALID),
    Case("GetTeams", "unknown-domain", pb.GetTeamsRequest(uri=A, domain="nope"), NOT_FOUND),
    Case("GetTeams", "malformed-uri", pb.GetTeamsRequest(uri=BAD_URI, domain="vm1"), INVALID),
    Case("GetTeams", "unreachable", pb.GetTeamsRequest(uri=C, domain="vm1"), UNREACHABLE),
    Case("SetTeam", "no-name", set_team(name=""), INVALID),
    Case("SetTeam", "malformed-mac", set_team(standby_mac="52:54:zz"), INVALID),
    Case("SetTeam", "malformed-team-mac", set_team(team_mac="nope"), INVALID),
    Case("SetTeam", "unknown-mac-policy", set_team(mac_policy="sometimes"), INVALID),
    Case("SetTeam", "malformed-pool-name", set_team(pool="a b"), INVALID),
    Case("SetTeam", "malformed-team-name", set_team(name="lan\nwan"), INVALID),
    Case("SetTeam", "unknown-domain", set_team(domain="nope"), NOT_FOUND),
    Case("SetTeam", "unknown-primary-alias", set_team(primary_alias="ua-gone"), NOT_FOUND),
    Case("SetTeam", "unreachable", set_team(uri=C), UNREACHABLE),
    Case("RemoveTeam", "no-name", pb.RemoveTeamRequest(uri=A, domain="vm1"), INVALID),
    Case(
        "RemoveTeam",
        "unknown-team",
        pb.RemoveTeamRequest(uri=A, domain="vm1", name="dmz"),
        NOT_FOUND,
    ),
    Case(
        "RemoveTeam",
        "unknown-domain",
        pb.RemoveTeamRequest(uri=A, domain="nope", name="lan"),
        NOT_FOUND,
    ),
    Case("DefinePool", "no-name", define_pool(name=""), INVALID),
    Case("DefinePool", "malformed-name", define_pool(name="a/b"), INVALID),
    Case("DefinePool", "unknown-kind", define_pool(kind="teleport"), INVALID),
    Case("DefinePool", "malformed-address", define_pool(addresses=["3b:00"]), INVALID),
    Case(
        "DefinePool",
        "malformed-slot-mac",
        define_pool(kind="emulated", addresses=[], bridge="br0", slots=[pb.TapSlot(tap="t1")]),
        INVALID,
    ),
    Case("DefinePool", "malformed-uri", define_pool(uri=BAD_URI), INVALID),
    Case("DefinePool", "unreachable", define_pool(uri=C), UNREACHABLE),
    Case("UndefinePool", "no-name", pb.UndefinePoolRequest(uri=A), INVALID),
    Case("UndefinePool", "unknown-pool", pb.UndefinePoolRequest(uri=A, name="nope"), NOT_FOUND),
    Case("UndefinePool", "unreachable", pb.UndefinePoolRequest(uri=C, name="lab"), UNREACHABLE),
    Case("Cancel", "no-domain", pb.CancelRequest(), INVALID),
    Case("Cancel", "nothing-running", pb.CancelRequest(domain="vm1"), NOT_FOUND),
    Case("Cancel", "negative-wait", pb.CancelRequest(domain="vm1", wait_seconds=-1), INVALID),
]


def journal_rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the journal, read apart from the Journal class."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: sorted(db.execute(f"SELECT * FROM {t}"), key=repr) for t in tables}


@pytest.fixture
def ptmigd(world: World, journal_path: Path, short_tmp: Path) -> Iterator[tuple[Any, Journal]]:
    with world_ptmigd(world, journal_path, short_tmp) as served:
        yield served


def call(stub: Any, rpc: str, request: Any) -> tuple[grpc.StatusCode, str]:
    method = getattr(stub, rpc)
    try:
        answer = method(request, timeout=CALL_TIMEOUT)
        if rpc in ("Migrate", "Evacuate"):
            list(answer)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def test_every_rpc_of_the_service_has_bad_input_cases() -> None:
    service = pb.DESCRIPTOR.services_by_name["Coordinator"]
    assert {m.name for m in service.methods} == {c.rpc for c in CASES}
    assert len({str(c) for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_is_named_by_its_status_and_changes_nothing(
    case: Case, ptmigd: tuple[Any, Journal], world: World, journal_path: Path
) -> None:
    stub, journal = ptmigd
    if case.setup is not None:
        case.setup(world, journal)
    before, rows = world.snapshot(), journal_rows(journal_path)
    world.calls.clear()

    code, details = call(stub, case.rpc, case.request)

    assert code == case.code, details
    if code != OK:
        assert details and "\n" not in details
        assert "internal error" not in details
    assert world.snapshot() == before
    if not case.records:
        assert world.mutations() == []
    after = journal_rows(journal_path)
    if case.records:
        (new,) = [r[0] for r in after["workflows"] if r not in rows["workflows"]]
        record = journal.get(new)
        assert record is not None and not record.is_open
        assert journal.open_workflows() == [w for w in journal.open_workflows() if w.id != new]
        after["workflows"] = [r for r in after["workflows"] if r[0] != new]
        after["steps"] = [s for s in after["steps"] if s[0] != new]
    assert after == rows
