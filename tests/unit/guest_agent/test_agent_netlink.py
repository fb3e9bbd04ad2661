"""guest_agent.netlink against the real kernel, in a private network namespace,
on both pyroute2 0.7.2 (Debian 12) and the venv's current release."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from agent_runtimes import REPO, runtimes

PROBE = Path(__file__).with_name("agent_netlink_probe.py")


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a private network namespace"
    if not shutil.which("unshare") or not shutil.which("ip"):
        return "needs unshare (util-linux) and ip (iproute2)"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        return "unshare -n is not permitted here"
    return None


@pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))
@pytest.mark.parametrize("python", runtimes("pyroute2"))
def test_netlink_on_a_real_kernel(python: str, tmp_path: Path) -> None:
    result = subprocess.run(
        ["unshare", "-n", python, "-I", str(PROBE), str(REPO), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["lo"] and found["kind"] == "veth" and found["mac"] == "02:00:00:00:00:0a"
    assert found["multicast_mac"] == "LinkRefused errno=99"
    assert found["carrier_with_peer_down"] is False
    assert found["appeared_after_s"] < 2 and found["carrier_after_s"] < 2  # woken by events
    assert 0.25 <= found["timeout_after_s"] < 1
    assert found["missing_link"] == "NoSuchLink errno=19"
    assert found["active_slave_on_veth"] == "BondingUnavailable errno=95"
    bond = found["bond"]
    assert bond == "BondingUnavailable errno=95" or bond == {
        "active_is_va": True,
        "fail_over_mac": "ACTIVE",
    }
