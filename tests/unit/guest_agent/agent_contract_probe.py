"""Start the agent servicer over the fake links and call it through gRPC.

Usage: PYTHON -I agent_contract_probe.py REPO_ROOT SOCKET_DIR
Prints one JSON line; the contract test runs this on Debian 12's stock python3
(grpcio 1.51, protobuf 3.21) and on the venv (current PyPI releases).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

repo = Path(sys.argv[1])
sys.path[:0] = [str(repo), str(repo / "protos"), str(Path(__file__).parent)]

import google.protobuf  # noqa: E402
import grpc  # noqa: E402
from agent_fake_links import FakeLinks  # noqa: E402
from agent_grpc import agent_server, stubs  # noqa: E402
from agent_scene import build_scene, lan_team  # noqa: E402
from ptmig.v1 import guest_agent_pb2 as pb  # noqa: E402


def main() -> None:
    fake = FakeLinks()
    build_scene(fake)
    sock = str(Path(sys.argv[2]) / "agent.sock")
    with agent_server(sock, fake, [lan_team()]), stubs(f"unix:{sock}") as (stub, health):
        state = stub.GetState(pb.GetStateRequest(operation_id="probe"), timeout=10)
        version = stub.GetVersion(pb.GetVersionRequest(operation_id="probe"), timeout=10)
        status = health.Check(pb.HealthCheckRequest(), timeout=10).status
        switched = stub.UseStandby(
            pb.UseStandbyRequest(operation_id="sw", team="lan", release_primary=True), timeout=10
        )
        try:
            stub.UseStandby(pb.UseStandbyRequest(operation_id="x", team="nope"), timeout=10)
            error = "none"
        except grpc.RpcError as exc:
            error = exc.code().name
    fake.close()
    print(
        json.dumps(
            {
                "grpc": grpc.__version__,
                "protobuf": google.protobuf.__version__,
                "links": sorted(link.name for link in state.links),
                "active": state.teams[0].active_member,
                "after_switch": switched.team.active_member,
                "api_version": version.api_version,
                "health": status,
                "unknown_team": error,
            }
        )
    )


if __name__ == "__main__":
    main()
