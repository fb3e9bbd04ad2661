"""The GuestAgent servicer through a real gRPC channel on a unix socket."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from agent_fake_links import FakeLinks
from agent_grpc import agent_server, stubs
from agent_reachable import reachable
from agent_scene import NEW_MAC, NEW_PCI, OLD_MAC, lan_team
from google.protobuf.message import Message
from ptmig.v1 import guest_agent_pb2 as pb

from guest_agent import __version__
from guest_agent.operations import OperationLog
from guest_agent.teams import DeviceMatch

OTHER = lan_team(name="db", bond="bond1", standby=DeviceMatch(name="enp9s0"), mac=None)


@pytest.fixture
def agent(fake: FakeLinks, short_tmp: Path) -> Iterator[Any]:
    path = str(short_tmp / "run" / "agent.sock")
    with agent_server(path, fake, [lan_team(), OTHER]), stubs(f"unix:{path}") as (stub, _):
        yield stub


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def switch(stub: Any, op: str = "op-1", release: bool = True) -> Any:
    return stub.UseStandby(
        pb.UseStandbyRequest(operation_id=op, team="lan", release_primary=release)
    )


def test_get_version(agent: Any) -> None:
    reply = agent.GetVersion(pb.GetVersionRequest(operation_id="v"))
    assert reply.agent_version == __version__ and reply.api_version == 1
    assert {"use-standby", "bind-primary", "mac-policy:follow"} <= set(reply.capabilities)


def test_get_state_reports_links_and_teams(agent: Any) -> None:
    reply = agent.GetState(pb.GetStateRequest(operation_id="s"))
    links = {link.name: link for link in reply.links}
    assert links["enp2s0"].master == "bond0" and links["enp2s0"].pci_address == "0000:02:00.0"
    assert links["enp2s0"].permanent_mac == OLD_MAC and links["enp2s0"].carrier
    assert links["bond0"].kind == "bond"
    lan = reply.teams[0]
    assert (lan.name, lan.active_member, lan.standby, lan.primary) == (
        "lan",
        "enp2s0",
        "enp1s0",
        "enp2s0",
    )
    assert lan.mac_policy == pb.MAC_POLICY_PRESERVE and lan.ownership == pb.OWNERSHIP_ADMIN
    assert lan.fail_over_mac == "none" and list(lan.members) == ["enp1s0", "enp2s0"]


def test_switch_then_bind(agent: Any, fake: FakeLinks) -> None:
    reply = switch(agent)
    assert reply.team.active_member == "enp1s0" and list(reply.released) == ["enp2s0"]
    fake.remove("enp2s0")
    fake.hotplug_later(0.1, "enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    bound = agent.BindPrimary(
        pb.BindPrimaryRequest(operation_id="op-2", team="lan", pci_address=NEW_PCI, timeout_ms=3000)
    )
    assert bound.device == "enp3s0" and bound.team.active_member == "enp3s0"
    assert not bound.replayed and fake.get("enp3s0").mac == OLD_MAC


def test_a_switch_whose_caller_gave_up_while_queued_does_not_run(
    agent: Any, fake: FakeLinks, logged: Callable[..., threading.Event]
) -> None:
    """The host gave up on a switch queued behind a bind (a stopped agent, then resumed):
    run late, it would undo the newer bind.  It does nothing; a retry of it does run."""
    switch(agent)
    fake.remove("enp2s0")
    fake.hotplug_later(1.0, "enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    bind = pb.BindPrimaryRequest(
        operation_id="bind", team="lan", pci_address=NEW_PCI, timeout_ms=5000
    )
    bound: list[Any] = []
    binder = threading.Thread(target=lambda: bound.append(agent.BindPrimary(bind)))
    waits = fake.waits
    binder.start()
    fake.waiting(waits, "the bind holding team lan, waiting for the device")
    abandoned = logged("guest_agent.service", "operation_id='late'", "-> CANCELLED")
    late = pb.UseStandbyRequest(operation_id="late", team="lan", release_primary=False)
    code, _ = code_of(lambda: agent.UseStandby(late, timeout=0.3))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    binder.join()

    assert bound and bound[0].team.active_member == "enp3s0"
    # the abandoned switch had its turn at the lock after the bind, and did nothing
    assert abandoned.wait(10), "the queued switch never ran"
    assert fake.get("bond0").bond.active_slave == fake.get("enp3s0").index  # type: ignore[union-attr]
    again = agent.UseStandby(late)  # the same id again: not a replay of "abandoned"
    assert not again.replayed and again.team.active_member == "enp1s0"


def test_retry_with_same_operation_id_replays(agent: Any, fake: FakeLinks) -> None:
    first = switch(agent)
    calls = fake.changes()
    again = switch(agent)
    assert again.replayed and not first.replayed
    assert again.team == first.team and fake.changes() == calls


def test_recorded_outcomes_are_bytes_not_live_messages(fake: FakeLinks, short_tmp: Path) -> None:
    """The log keeps no protobuf message between calls: on Debian 12's protobuf a message
    is C++ memory in the RPC thread's malloc arena, and the log's 256 of them kept +8 MB
    of that arena resident in the lab guest (issue 24).  Replays still answer the same."""
    path = str(short_tmp / "run" / "agent.sock")
    log: OperationLog[Any] = OperationLog(16)
    server = agent_server(path, fake, [lan_team(), OTHER], operations=log)
    with server, stubs(f"unix:{path}") as (stub, _):
        replies = [switch(stub, op=f"op-{number}") for number in range(3)]
        assert len(log) == 3
        kept = [obj for obj in reachable(log) if isinstance(obj, Message)]
        assert kept == []
        again = switch(stub, op="op-0")
    assert again.replayed and again.team == replies[0].team
    assert list(again.released) == ["enp2s0"] == list(replies[0].released)


def test_retry_while_first_call_runs_waits_for_it(agent: Any, fake: FakeLinks) -> None:
    switch(agent)
    fake.remove("enp2s0")
    fake.hotplug_later(0.3, "enp3s0", mac=NEW_MAC, pci=NEW_PCI)
    request = pb.BindPrimaryRequest(operation_id="bind-1", team="lan", mac=NEW_MAC)
    replies: list[Any] = []
    threads = [threading.Thread(target=lambda: replies.append(agent.BindPrimary(request)))]
    threads[0].start()
    replies.append(agent.BindPrimary(request))
    threads[0].join()
    assert sorted(reply.replayed for reply in replies) == [False, True]
    assert [call[0] for call in fake.calls].count("enslave") == 1


def test_replayed_failure_does_not_act_again(agent: Any, fake: FakeLinks) -> None:
    request = pb.BindPrimaryRequest(
        operation_id="b", team="lan", pci_address=NEW_PCI, timeout_ms=100
    )
    assert code_of(lambda: agent.BindPrimary(request))[0] == grpc.StatusCode.NOT_FOUND
    fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI)  # too late for operation "b"
    assert code_of(lambda: agent.BindPrimary(request))[0] == grpc.StatusCode.NOT_FOUND
    assert fake.calls == []


def test_operation_id_reused_for_other_request(agent: Any) -> None:
    switch(agent, op="x", release=False)
    code, message = code_of(lambda: switch(agent, op="x", release=True))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "different request" in message


@pytest.mark.parametrize(
    ("request_", "code", "text"),
    [
        (pb.UseStandbyRequest(team="lan"), grpc.StatusCode.INVALID_ARGUMENT, "operation_id"),
        (
            pb.UseStandbyRequest(operation_id="1", team="wan"),
            grpc.StatusCode.NOT_FOUND,
            "unknown team",
        ),
        (
            pb.BindPrimaryRequest(operation_id="2", team="wan", mac=NEW_MAC),
            grpc.StatusCode.NOT_FOUND,
            "unknown team",
        ),
        (
            pb.BindPrimaryRequest(operation_id="3", team="lan", pci_address=NEW_PCI, timeout_ms=50),
            grpc.StatusCode.NOT_FOUND,
            "no device with pci 0000:03:00.0",
        ),
        (
            pb.BindPrimaryRequest(operation_id="4", team="lan", pci_address="0000:05:00.0"),
            grpc.StatusCode.FAILED_PRECONDITION,
            "member of team db",
        ),
        (
            pb.BindPrimaryRequest(operation_id="5", team="lan", mac="52:54:00:bb:00"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "malformed MAC",
        ),
        (
            pb.BindPrimaryRequest(operation_id="6", team="lan", mac=NEW_MAC, mac_policy=9),
            grpc.StatusCode.INVALID_ARGUMENT,
            "mac_policy",
        ),
        (
            pb.BindPrimaryRequest(operation_id="7", team="lan", mac="x" * 100_000),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "",
        ),
    ],
    ids=[
        "no-op-id",
        "switch-unknown-team",
        "bind-unknown-team",
        "unknown-device",
        "other-team",
        "bad-mac",
        "bad-policy",
        "oversized",
    ],
)
def test_bad_requests_get_clear_errors_and_change_nothing(
    agent: Any, fake: FakeLinks, request_: Any, code: grpc.StatusCode, text: str
) -> None:
    method = agent.UseStandby if isinstance(request_, pb.UseStandbyRequest) else agent.BindPrimary
    got, message = code_of(lambda: method(request_))
    assert got == code
    assert text in message and "Traceback" not in message
    assert fake.calls == []


def test_carrier_timeout_is_deadline_exceeded(agent: Any, fake: FakeLinks) -> None:
    switch(agent)
    fake.remove("enp2s0")
    fake.add("enp3s0", mac=NEW_MAC, pci=NEW_PCI, carrier=False)
    request = pb.BindPrimaryRequest(
        operation_id="c", team="lan", pci_address=NEW_PCI, timeout_ms=200
    )
    code, message = code_of(lambda: agent.BindPrimary(request))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no carrier" in message


def test_grpc_deadline_caps_the_wait(agent: Any, fake: FakeLinks) -> None:
    fake.set_carrier("enp1s0", False)
    request = pb.UseStandbyRequest(operation_id="d", team="lan", timeout_ms=60_000)
    code, _ = code_of(lambda: agent.UseStandby(request, timeout=0.5))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_get_state_waits_for_a_busy_team_but_answers_within_the_callers_deadline(
    agent: Any, fake: FakeLinks
) -> None:
    """GetState waits for a team operation in progress (so a half-built team is not
    reported), yet answers before the caller's deadline (1 s less), not DEADLINE_EXCEEDED."""
    fake.set_carrier("enp1s0", False)
    request = pb.UseStandbyRequest(operation_id="w", team="lan", timeout_ms=60_000)
    switching = threading.Thread(target=lambda: agent.UseStandby(request, timeout=4))
    waits = fake.waits
    switching.start()
    fake.waiting(waits, "the switch holding team lan, waiting for the standby's carrier")
    started = time.monotonic()
    reply = agent.GetState(pb.GetStateRequest(operation_id="busy"), timeout=2.0)
    took = time.monotonic() - started
    fake.set_carrier("enp1s0", True)  # the switch completes
    switching.join()
    assert 0.7 <= took < 2.0, took
    assert reply.teams[0].active_member == "enp2s0"
    after = agent.GetState(pb.GetStateRequest(operation_id="idle"), timeout=2.0)
    assert after.teams[0].active_member == "enp1s0"


def test_unexpected_failure_is_internal_without_traceback(
    agent: Any, fake: FakeLinks, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(fake, "list_links", broken)
    with caplog.at_level(logging.ERROR):
        code, message = code_of(lambda: agent.GetState(pb.GetStateRequest(operation_id="e")))
    assert code == grpc.StatusCode.INTERNAL
    assert message == "internal error: ZeroDivisionError: boom"
    assert "Traceback" in caplog.text  # the traceback stays in the agent's log


def test_state_changes_are_logged(agent: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="guest_agent"):
        switch(agent, op="logged")
    assert (
        "UseStandby (operation_id='logged', team='lan', release_primary=True) -> OK" in caplog.text
    )


def test_health_check(fake: FakeLinks, short_tmp: Path) -> None:
    path = str(short_tmp / "agent.sock")
    with agent_server(path, fake, [lan_team()]), stubs(f"unix:{path}") as (_, health):
        assert health.Check(pb.HealthCheckRequest()).status == pb.HealthCheckResponse.SERVING
        ok = health.Check(pb.HealthCheckRequest(service="ptmig.v1.GuestAgent"))
        assert ok.status == pb.HealthCheckResponse.SERVING
        code, _ = code_of(lambda: health.Check(pb.HealthCheckRequest(service="nope")))
        assert code == grpc.StatusCode.NOT_FOUND


def test_allow_list_refuses_other_rpcs(fake: FakeLinks, short_tmp: Path) -> None:
    path = str(short_tmp / "agent.sock")
    allowed = ["GuestAgent/GetState", "Health/Check"]
    with (
        agent_server(path, fake, [lan_team()], allowed=allowed),
        stubs(f"unix:{path}") as (stub, _),
    ):
        assert stub.GetState(pb.GetStateRequest(operation_id="s")).teams
        code, message = code_of(lambda: switch(stub))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "UseStandby" in message
    assert fake.calls == []


def test_socket_is_root_only(fake: FakeLinks, short_tmp: Path) -> None:
    path = short_tmp / "run" / "agent.sock"
    with agent_server(str(path), fake, [lan_team()]):
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_stale_socket_is_replaced_but_other_files_are_not(fake: FakeLinks, short_tmp: Path) -> None:
    path = short_tmp / "agent.sock"
    with agent_server(str(path), fake, [lan_team()]):
        pass
    with agent_server(str(path), fake, [lan_team()]), stubs(f"unix:{path}") as (stub, _):
        assert stub.GetVersion(pb.GetVersionRequest()).api_version == 1
    path.unlink(missing_ok=True)
    path.write_text("not a socket")
    from guest_agent.server import SocketError

    with pytest.raises(SocketError, match="not a socket"), agent_server(str(path), fake, []):
        pass
