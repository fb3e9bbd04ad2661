"""The agent's start-up: it serves before its netlink warm-up has finished, the first call
after start still answers, and serving imports no pyroute2 (and pyroute2 only its IPRoute),
on the venv's current PyPI packages and on Debian 12's."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from agent_fake_links import FakeLinks
from agent_grpc import stubs
from agent_runtimes import REPO, runtimes
from ptmig.v1 import guest_agent_pb2 as pb

from guest_agent import config, netlink, server

#: Run in a fresh interpreter: what importing the serving path and the warm-up load.
IMPORTS_PROBE = """
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/protos"]
at_start = set(sys.modules)
import guest_agent.__main__
from guest_agent import config, netlink, server
serving = set(sys.modules) - at_start
netlink.warm_up()
warm = set(sys.modules) - at_start
iproute, _ = netlink._pyroute2()
with iproute() as ipr:
    names = [msg.get_attr("IFLA_IFNAME") for msg in ipr.get_links()]
package_after_warm_up = "pyroute2" in sys.modules
import pyroute2
print(json.dumps({
    "serving_pyroute2": sorted(m for m in serving if m.startswith("pyroute2")),
    "serving_pathlib": "pathlib" in serving,
    "warm_pyroute2": len([m for m in warm if m.startswith("pyroute2")]),
    "warm_ndb": sorted(m for m in warm if m.startswith(("pyroute2.ndb", "pyroute2.ipdb"))),
    "package_after_warm_up": package_after_warm_up,
    "lo": "lo" in names,
    "real_package": hasattr(pyroute2, "IPRoute") and hasattr(pyroute2, "NDB"),
}))
"""


@pytest.mark.parametrize("python", runtimes("grpc", "google.protobuf", "pyroute2"))
def test_serving_imports_no_pyroute2_and_the_warm_up_only_its_iproute(python: str) -> None:
    result = subprocess.run(
        [python, "-I", "-c", IMPORTS_PROBE, str(REPO)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["serving_pyroute2"] == []
    assert not found["serving_pathlib"]
    assert found["warm_pyroute2"] > 0 and found["warm_ndb"] == []  # IPRoute, not NDB/IPDB
    assert found["lo"]
    assert not found["package_after_warm_up"]  # the empty package was taken out again
    assert found["real_package"]  # and a later `import pyroute2` is the whole package


def _config(socket_path: Path) -> config.AgentConfig:
    return config.parse(
        {
            "socket": str(socket_path),
            "transports": {"virtio_serial": {"enabled": False}, "vsock": {"enabled": False}},
        }
    )


def test_agent_serves_before_its_warm_up_has_finished(short_tmp: Path) -> None:
    release = threading.Event()
    warming = threading.Event()

    def slow_warm_up() -> None:
        warming.set()
        release.wait(30)

    links = FakeLinks()
    sock = short_tmp / "agent.sock"
    agent = server.start(_config(sock), links, warm_up=slow_warm_up)
    try:
        assert warming.wait(5)
        with stubs(f"unix:{sock}", private=True) as (agent_stub, health):
            version = agent_stub.GetVersion(pb.GetVersionRequest(), timeout=5)
            assert version.api_version == 1
            assert health.Check(pb.HealthCheckRequest(), timeout=5).status == (
                pb.HealthCheckResponse.SERVING
            )
            state = agent_stub.GetState(pb.GetStateRequest(operation_id="s"), timeout=5)
            assert [link.name for link in state.links] == ["lo"]
        assert not release.is_set()  # all of it answered while the warm-up still ran
    finally:
        release.set()
        agent.stop()
        links.close()


def test_first_call_waits_for_the_warm_ups_import_and_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GetState's dump that comes while the warm-up imports pyroute2 waits for that one
    import (it is not done twice), then reads the real links."""
    real_import = netlink._import_iproute
    imports: list[float] = []
    importing = threading.Event()

    def slow_import() -> tuple[Any, type[Exception]]:
        imports.append(time.monotonic())
        importing.set()
        time.sleep(0.5)  # the slow import the first call must wait for (the behaviour)
        return real_import()

    monkeypatch.setattr(netlink, "_imported", None)
    monkeypatch.setattr(netlink, "_import_iproute", slow_import)
    warm = threading.Thread(target=netlink.warm_up)
    warm.start()
    assert importing.wait(10)
    links = netlink.NetlinkLinks().list_links()  # the first call, mid-import
    warm.join(10)
    assert any(link.name == "lo" for link in links)
    assert len(imports) == 1


def test_a_failed_warm_up_is_logged_and_the_call_reports_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> tuple[Any, type[Exception]]:
        raise ImportError("No module named 'pyroute2'")

    monkeypatch.setattr(netlink, "_imported", None)
    monkeypatch.setattr(netlink, "_import_iproute", broken)
    netlink.warm_up()  # does not raise
    assert "netlink warm-up failed (ImportError" in caplog.text
    with pytest.raises(ImportError):
        netlink.NetlinkLinks().list_links()
