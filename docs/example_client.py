"""A management layer driving ptmig over its gRPC API (protos/ptmig/v1/coordinator.proto).

It describes a pool on the destination host and a domain's team, migrates the domain while
printing the workflow's events, and reads back where each team ended up: everything an
operator does with the ``ptmig`` CLI, through ``ptmigd``.  Run by
tests/unit/host/test_example_client.py; on a real host::

    python3 docs/example_client.py --socket /run/ptmig/ptmigd.sock web1 \\
        qemu:///system qemu+tcp://host2/system --pool-slot ptv-b1=52:54:00:cb:00:01

Only the generated contract (the ``ptmig`` package) and grpcio are needed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import grpc
from ptmig.v1 import coordinator_pb2 as pb
from ptmig.v1 import coordinator_pb2_grpc as pb_grpc


def drive(
    stub: pb_grpc.CoordinatorStub,
    domain: str,
    source: str,
    destination: str,
    slots: Sequence[tuple[str, str]],
) -> pb.MigrationReport:
    """Define the pool, describe the team, migrate; the migration's report."""
    pool = stub.DefinePool(
        pb.DefinePoolRequest(
            uri=destination,
            name="lab",
            kind="emulated",
            bridge="br-g",
            model="e1000e",
            slots=[pb.TapSlot(tap=tap, mac=mac) for tap, mac in slots],
        )
    )
    print(f"pool {pool.name} on {destination}: {pool.free} of {pool.total} free")

    teams = stub.GetTeams(pb.GetTeamsRequest(uri=source, domain=domain))
    lan = next(t for t in teams.teams if t.name == "lan")
    stub.SetTeam(  # same team, MAC policy changed: the metadata travels with the domain
        pb.SetTeamRequest(
            uri=source,
            domain=domain,
            name=lan.name,
            standby_mac=lan.standby_mac,
            pool=lan.pool,
            mac_policy="none",  # follow would need the guest's bond0 with fail_over_mac active
            team_mac=lan.team_mac,
            primary_alias=lan.primary.alias,
        )
    )

    report = None
    for event in stub.Migrate(
        pb.MigrateRequest(domain=domain, source_uri=source, destination_uri=destination)
    ):
        if event.HasField("report"):
            report = event.report
        elif event.state != "progress":
            print(f"{event.phase}: {event.state} {event.message}".rstrip())
    if report is None:
        raise RuntimeError("the Migrate stream ended without a report")
    print(f"{report.domain}: {report.outcome_text} {dict(sorted(report.teams.items()))}")

    status = stub.GetStatus(pb.GetStatusRequest(uri=destination, domain=domain))
    for team in status.teams:
        print(f"team {team.name}: on {team.mode_text}, primary {team.primary.alias or '-'}")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", default="/run/ptmig/ptmigd.sock")
    parser.add_argument("domain")
    parser.add_argument("source")
    parser.add_argument("destination")
    parser.add_argument("--pool-slot", action="append", default=[], metavar="TAP=MAC")
    args = parser.parse_args(argv)
    slots = [tuple(s.split("=", 1)) for s in args.pool_slot]
    with grpc.insecure_channel(f"unix:{args.socket}") as channel:
        report = drive(
            pb_grpc.CoordinatorStub(channel),
            args.domain,
            args.source,
            args.destination,
            [(tap, mac) for tap, mac in slots],
        )
    return 0 if report.outcome == pb.OUTCOME_DONE else 1


if __name__ == "__main__":
    sys.exit(main())
