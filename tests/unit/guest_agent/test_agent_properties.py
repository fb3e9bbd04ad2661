"""Property tests of the agent's request handling and of its TOML config.

Requests: sequences of near-valid UseStandby / BindPrimary / GetState / Health
requests against the fake links; every answer is a reply or a gRPC status with one
of the contract's codes for a bad request (never INTERNAL, never an exception),
and a refused request leaves the links and the kernel calls exactly as they were.

Config: the example config, mutated as TOML data and as text; load/parse give an
AgentConfig or a ConfigError, nothing else.
"""

from __future__ import annotations

import copy
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import grpc
from agent_fake_links import FakeLinks
from agent_scene import NEW_MAC, NEW_PCI, OLD_MAC, OLD_PCI, VIRTIO_MAC, build_scene, lan_team
from hypothesis import example, given, settings
from hypothesis import strategies as st
from ptmig.v1 import guest_agent_pb2 as pb
from test_agent_config import EXAMPLE

from guest_agent import config
from guest_agent.operations import OperationLog
from guest_agent.service import GuestAgentServicer, HealthServicer
from guest_agent.teams import DeviceMatch, Teams

OTHER = lan_team(name="db", bond="bond1", standby=DeviceMatch(name="enp5s0"), mac=None)
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code = code
        self.details = details


class Context:
    """The part of grpc.ServicerContext the servicers use."""

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        raise Aborted(code, details)

    def time_remaining(self) -> float | None:
        return None

    def is_active(self) -> bool:
        return True


def scene() -> FakeLinks:
    """The tests' guest, plus a free NIC to bind and one udev has not finished with."""
    links = FakeLinks()
    build_scene(links)
    links.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    links.add("eth9", mac="52:54:00:ee:00:09", pci="0000:09:00.0", udev_initialized=False)
    return links


TEAMS = st.sampled_from(["lan", "db", "", "LAN", "lan ", "lan\x00", "bond0", "x" * 300, "é"])
PCIS = st.sampled_from(
    [
        "",
        NEW_PCI,
        "03:00.0",
        OLD_PCI,
        "0000:01:00.0",
        "0000:05:00.0",
        "0000:09:00.0",
        "0000:0a:00.0",
        "0000:03:00.8",
        "0000:03:00",
        "zz",
        " 0000:03:00.0 ",
        "0000:03:00.0\n",
        "9" * 1000,
    ]
)
MACS = st.sampled_from(
    [
        "",
        NEW_MAC,
        NEW_MAC.upper(),
        NEW_MAC.replace(":", "-"),
        OLD_MAC,
        VIRTIO_MAC,
        "52:54:00:dd:00:05",
        "52:54:00:ee:00:09",
        "01:00:5e:00:00:01",
        "00:00:00:00:00:00",
        "52:54:00:cc:00",
        "52:54:00:cc:00:02:03",
        "gg:54:00:cc:00:02",
        "x" * 1000,
    ]
)
OP_IDS = st.sampled_from(["", "op-1", "op-2", "op-3", "\x00", "é" * 100, "o" * 10_000])


def _text(choices: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(choices, st.text(max_size=20))


REQUESTS = st.one_of(
    st.builds(
        pb.UseStandbyRequest,
        operation_id=OP_IDS,
        team=_text(TEAMS),
        release_primary=st.booleans(),
        timeout_ms=st.sampled_from([1, 20, 50]),
    ),
    st.builds(
        pb.BindPrimaryRequest,
        operation_id=OP_IDS,
        team=_text(TEAMS),
        pci_address=_text(PCIS),
        mac=_text(MACS),
        mac_policy=st.integers(-2, 6),
        timeout_ms=st.sampled_from([1, 20, 50]),
    ),
    st.builds(pb.GetStateRequest, operation_id=OP_IDS),
    st.builds(pb.GetVersionRequest, operation_id=OP_IDS),
    st.builds(pb.HealthCheckRequest, service=st.sampled_from(["", "ptmig.v1.GuestAgent", "x"])),
)


def call(agent: GuestAgentServicer, request: Any) -> Any:
    method = {
        pb.UseStandbyRequest: agent.UseStandby,
        pb.BindPrimaryRequest: agent.BindPrimary,
        pb.GetStateRequest: agent.GetState,
        pb.GetVersionRequest: agent.GetVersion,
        pb.HealthCheckRequest: HealthServicer().Check,
    }[type(request)]
    return method(request, Context())


def snapshot(links: FakeLinks) -> tuple[Any, ...]:
    return tuple(links.list_links()), len(links.calls)


@settings(max_examples=300)
@given(st.lists(REQUESTS, min_size=1, max_size=5))
@example(
    [pb.BindPrimaryRequest(operation_id="op-1", team="lan", mac="52:54:00:dd:00:05", timeout_ms=20)]
)  # another team's member
@example(
    [
        pb.UseStandbyRequest(operation_id="op-1", team="lan", timeout_ms=20),
        pb.UseStandbyRequest(operation_id="op-1", team="db", timeout_ms=20),
    ]
)  # id reused
def test_requests_answer_or_refuse_and_a_refusal_changes_nothing(requests: list[Any]) -> None:
    links = scene()
    try:
        agent = GuestAgentServicer(Teams(links, [lan_team(), OTHER]), OperationLog(8), 0.05)
        for request in requests:
            before = snapshot(links)
            try:
                reply = call(agent, request)
            except Aborted as refused:
                assert refused.code in REFUSALS or (
                    refused.code is grpc.StatusCode.NOT_FOUND
                    and isinstance(request, pb.HealthCheckRequest)
                ), refused.details
                assert "\n" not in refused.details
                assert snapshot(links) == before, f"{refused.details} but links changed"
                continue
            assert reply.IsInitialized()
    finally:
        links.close()


# -- config ------------------------------------------------------------------------------

EXAMPLE_DATA = tomllib.loads(EXAMPLE)
CONFIG_VALUES = st.one_of(
    st.sampled_from(
        [
            "",
            "/run/x.sock",
            "relative",
            "enp1s0",
            "a" * 16,
            "preserve",
            "follow",
            "agent",
            "52:54:00:bb:00:01",
            "05:00.1",
            "GuestAgent/GetState",
            0,
            -1,
            1024,
            2**63,
            True,
            1.5,
            [],
            ["x"],
            [{}],
            {},
            {"mac": "zz"},
            {"name": ""},
            {"pci_address": 5},
        ]
    ),
    st.text(max_size=10),
    st.integers(),
)
CONFIG_KEYS = st.sampled_from(
    [
        "socket",
        "max_message_bytes",
        "default_timeout_ms",
        "operation_log_size",
        "allowed_rpcs",
        "transports",
        "teams",
        "name",
        "bond",
        "standby",
        "mac_policy",
        "ownership",
        "mac",
        "primary",
        "num_peer_notif",
        "enabled",
        "port",
        "bogus",
    ]
)


def _tables(data: Any) -> list[dict[str, Any]]:
    if isinstance(data, dict):
        return [data, *(t for v in data.values() for t in _tables(v))]
    if isinstance(data, list):
        return [t for v in data for t in _tables(v)]
    return []


@st.composite
def mutated_config(draw: st.DrawFn) -> dict[str, Any]:
    data = copy.deepcopy(EXAMPLE_DATA)
    for _ in range(draw(st.integers(1, 4))):
        table = draw(st.sampled_from(_tables(data)))
        if table and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(table)))
            if draw(st.booleans()):
                del table[key]
                continue
        else:
            key = draw(CONFIG_KEYS)
        table[key] = copy.deepcopy(draw(CONFIG_VALUES))  # sampled lists are shared
    return data


@settings(max_examples=400)
@given(mutated_config())
def test_mutated_config_data_gives_a_config_or_config_error(data: dict[str, Any]) -> None:
    try:
        cfg = config.parse(data, "agent.toml")
    except config.ConfigError as exc:
        assert str(exc).startswith("agent.toml")
        return
    assert isinstance(cfg, config.AgentConfig)
    assert cfg.allowed_rpcs <= set(config.ALL_RPCS)
    assert len({t.name for t in cfg.teams}) == len(cfg.teams)


@settings(max_examples=200)
@given(st.binary(max_size=8), st.integers(0, len(EXAMPLE)), st.integers(0, 20))
@example(b"\xff", 10, 0)  # not UTF-8: was a bare UnicodeDecodeError
@example(b"x = " + b"[" * 5000, 0, 0)  # deep arrays: was a RecursionError
def test_mutated_config_text_gives_a_config_or_config_error(
    splice: bytes, at: int, cut: int
) -> None:
    text = EXAMPLE.encode()
    text = text[:at] + splice + text[at + cut :]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agent.toml"
        path.write_bytes(text)
        try:
            config.load(str(path))
        except config.ConfigError as exc:
            assert str(exc).startswith(str(path))
