"""The agent of a guest with no ptmig channel (a Nova or KubeVirt guest): it runs for its
guest-managed teams, and serves a channel that appears later; with nothing to serve it
exits 0 (the unit has no condition on the channels any more)."""

from __future__ import annotations

import contextlib
import logging
import os
import pty
import queue
import select
import socket
import threading
import tty
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fake_links import FakeLinks
from agent_grpc import stubs
from agent_host_side import HostConnector
from agent_scene import lan_team
from ptmig.v1 import guest_agent_pb2 as pb

from guest_agent import config, server
from guest_agent.__main__ import main
from guest_agent.rules import ManagedBy, PrimaryRule
from guest_agent.teams import TeamEvent

GUEST_MANAGED = {"managed_by": ManagedBy.GUEST, "primary_rule": PrimaryRule(driver="e1000e")}


def agent_config(tmp: Path, *teams: object, vsock: bool = False) -> config.AgentConfig:
    return config.AgentConfig(
        socket=str(tmp / "run" / "agent.sock"),
        teams=tuple(teams),  # type: ignore[arg-type]
        virtio_serial=config.SerialConfig(port=str(tmp / "port")),
        vsock=config.VsockConfig(enabled=vsock),
    )


def test_reasons_to_run(short_tmp: Path) -> None:
    coordinated = agent_config(short_tmp, lan_team())
    assert config.reasons_to_run(coordinated, exists=lambda _: False) == []
    port = str(short_tmp / "port")
    assert config.reasons_to_run(coordinated, exists=lambda p: p == port) == [
        f"virtio-serial port {port}"
    ]
    with_vsock = agent_config(short_tmp, lan_team(), vsock=True)
    assert config.reasons_to_run(with_vsock, exists=lambda p: p == "/dev/vsock") == [
        "vsock device /dev/vsock"
    ]
    guest = agent_config(short_tmp, lan_team(**GUEST_MANAGED))
    assert config.reasons_to_run(guest, exists=lambda _: False) == ["guest-managed team lan"]
    local = config.AgentConfig(
        virtio_serial=config.SerialConfig(enabled=False),
        vsock=config.VsockConfig(enabled=False),
    )
    assert config.reasons_to_run(local, exists=lambda _: False) == [
        "no transport enabled: the local socket alone"
    ]


def test_with_no_channel_and_no_guest_managed_team_the_agent_exits_0(
    short_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = short_tmp / "agent.toml"
    cfg.write_text(
        '[transports.virtio_serial]\nport = "' + str(short_tmp / "port") + '"\n'
        "[transports.vsock]\nenabled = false\n"
        '[[teams]]\nname = "lan"\nbond = "bond0"\nstandby = "enp1s0"\n'
    )
    caplog.set_level(logging.INFO)
    assert main(["--config", str(cfg), "--socket", str(short_tmp / "run" / "agent.sock")]) == 0
    assert "nothing to serve" in caplog.text
    assert not (short_tmp / "run").exists(), "it started nothing"


@contextlib.contextmanager
def late_port(path: Path) -> Iterator[socket.socket]:
    """A character device appearing at *path* (a raw pty's slave, linked there), and the
    host's end of it as a socket (bridged to the pty's master)."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    host, bridge = socket.socketpair()
    stop = threading.Event()

    def pump() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([master, bridge], [], [], 0.1)
            if master in ready:
                with contextlib.suppress(OSError):  # EIO: no slave open yet
                    bridge.sendall(os.read(master, 65536))
            if bridge in ready:
                os.write(master, bridge.recv(65536))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    path.symlink_to(os.ttyname(slave))
    try:
        yield host
    finally:
        stop.set()
        thread.join(timeout=5)
        for fd in (master, slave):
            os.close(fd)
        host.close()
        bridge.close()


def test_guest_managed_agent_runs_with_no_channel_and_serves_one_that_appears_later(
    fake: FakeLinks, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("guest_agent.transports.virtio_serial.REOPEN_S", 0.05)
    cfg = agent_config(short_tmp, lan_team(**GUEST_MANAGED))
    fake.update("enp2s0", pci_id="8086:10d3", driver="e1000e")
    recorded: queue.Queue[TeamEvent] = queue.Queue()
    agent = server.start(cfg, fake, on_event=lambda _team, event: recorded.put(event))
    try:
        assert agent.watcher is not None and agent.watcher.thread is not None
        assert agent.watcher.thread.is_alive()
        # with no channel at all the agent keeps the team whole: the primary pulled
        fake.remove("enp2s0")
        lost = recorded.get(timeout=10)
        assert (lost.kind, lost.device, lost.ok) == ("primary-lost", "enp2s0", True)
        # the channel appears: the relay opens it and the host asks over it
        with late_port(short_tmp / "port") as port:
            connector = HostConnector(str(short_tmp / "host.sock"), port)
            try:
                with stubs(f"unix:{connector.path}", private=True) as (stub, _):
                    state = stub.GetState(
                        pb.GetStateRequest(operation_id="late"), timeout=10, wait_for_ready=True
                    )
            finally:
                connector.close()
    finally:
        agent.stop()
    (lan,) = state.teams
    assert lan.managed_by_guest
    assert (lan.last_event.kind, lan.last_event.device) == ("primary-lost", "enp2s0")
    assert lan.active_member == "enp1s0"
