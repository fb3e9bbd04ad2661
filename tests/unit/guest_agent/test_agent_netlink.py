"""guest_agent.netlink against the real kernel, in a private network namespace,
on both pyroute2 0.7.2 (Debian 12) and the venv's current release."""

from __future__ import annotations

import json
import os
import shutil
import struct
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
    if found["lab_after_import"] is not None:  # 0.7 (0.9 has no pyroute2.lab, and its
        # iprsocket imports unittest.mock itself): IPRoute came without the mock, through
        # the stand-in, and a later `import pyroute2` got the real module
        assert found["mock_imported"] is False
        assert found["lab_after_import"] is True
    assert found["multicast_mac"] == "LinkRefused errno=99"
    assert found["carrier_with_peer_down"] is False
    assert found["appeared_after_s"] < 2 and found["carrier_after_s"] < 2  # woken by events
    assert 0.25 <= found["timeout_after_s"] < 1
    assert found["missing_link"] == "NoSuchLink errno=19"
    assert found["read_alone"] == ["va", True, "02:00:00:00:00:0a"]
    assert found["read_missing"] == "NoSuchLink errno=19"
    # vb's change at 0.2 s did not wake the wait on va; va's at 0.6 s did
    assert found["only_reads"] == [["va"], ["va"]]
    assert 0.55 <= found["only_woken_after_s"] < 2
    assert found["active_slave_on_veth"] == "BondingUnavailable errno=95"
    bond = found["bond"]
    assert bond == "BondingUnavailable errno=95" or bond == {
        "active_is_va": True,
        "fail_over_mac": "ACTIVE",
    }


def _nlmsg(kind: int, body: bytes) -> bytes:
    length = 16 + len(body)
    padding = b"\0" * (-length % 4)
    return struct.pack("=IHHII", length, kind, 0, 0, 0) + body + padding


def _ifinfo(index: int) -> bytes:
    return struct.pack("=BBHiII", 0, 0, 1, index, 0, 0)


def test_link_indexes_names_the_links_of_every_link_message_in_a_datagram() -> None:
    from guest_agent.netlink import RTM_DELLINK, RTM_NEWLINK, link_indexes

    route_msg = _nlmsg(24, b"\1\2\3")  # RTM_NEWROUTE, unpadded body: skipped, padding honoured
    data = _nlmsg(RTM_NEWLINK, _ifinfo(7)) + route_msg + _nlmsg(RTM_DELLINK, _ifinfo(3))
    assert link_indexes(data) == {7, 3}
    assert link_indexes(b"") == set()


@pytest.mark.parametrize(
    "data",
    [
        _nlmsg(16, _ifinfo(7))[:-4],  # cut short: its length runs past the datagram
        struct.pack("=IHHII", 8, 16, 0, 0, 0),  # a length shorter than its own header
        _nlmsg(16, b"\0\0\0\0"),  # a link message without its index
    ],
)
def test_link_indexes_of_an_unreadable_datagram_is_none(data: bytes) -> None:
    from guest_agent.netlink import link_indexes

    assert link_indexes(data) is None
