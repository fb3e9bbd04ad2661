"""The ptmig-agent entry point: config check, and a real start/stop on a unix socket."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from agent_runtimes import REPO
from ptmig.v1 import guest_agent_pb2 as pb
from ptmig.v1 import guest_agent_pb2_grpc as pb_grpc

from guest_agent.__main__ import main


def test_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "good.toml"
    good.write_text('[[teams]]\nname = "lan"\nbond = "bond0"\nstandby = "enp1s0"\n')
    assert main(["--config", str(good), "--check-config"]) == 0
    assert "1 team(s)" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("mac_policy = 1\n")
    assert main(["--config", str(bad), "--check-config"]) == 2
    assert "unknown key(s) ['mac_policy']" in capsys.readouterr().err


def test_agent_serves_on_its_socket_and_stops_on_sigterm(short_tmp: Path) -> None:
    """Real netlink, read-only: no teams configured, transports off."""
    cfg = short_tmp / "agent.toml"
    cfg.write_text(
        "[transports.virtio_serial]\nenabled = false\n[transports.vsock]\nenabled = false\n"
    )
    sock = short_tmp / "run" / "agent.sock"
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'protos'}"}
    agent = subprocess.Popen(
        [sys.executable, "-m", "guest_agent", "--config", str(cfg), "--socket", str(sock)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.05)
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        with grpc.insecure_channel(f"unix:{sock}") as channel:
            stub = pb_grpc.GuestAgentStub(channel)
            state = stub.GetState(
                pb.GetStateRequest(operation_id="main"), timeout=20, wait_for_ready=True
            )
            assert any(link.name == "lo" for link in state.links)
            assert "transport:vsock" not in stub.GetVersion(pb.GetVersionRequest()).capabilities
    finally:
        agent.send_signal(signal.SIGTERM)
        _, err = agent.communicate(timeout=20)
    assert agent.returncode == 0, err
    assert "listening on" in err and "no teams configured" in err


def test_parsing_the_command_line_does_not_import_shutil() -> None:
    """argparse's default formatter imports shutil (and with it bz2, lzma) on every start."""
    code = (
        "import sys\n"
        "before = 'shutil' in sys.modules\n"
        "from guest_agent.__main__ import build_parser\n"
        "build_parser().parse_args(['--config', '/x.toml'])\n"
        "print(before, 'shutil' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'protos'}"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_help_is_wrapped_at_the_terminal_width(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'protos'}"}
    for columns in (70, 120):
        result = subprocess.run(
            [sys.executable, "-m", "guest_agent", "--help"],
            env={**env, "COLUMNS": str(columns)},
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: ptmig-agent")
        widest = max(len(line) for line in result.stdout.splitlines())
        assert columns - 30 < widest <= columns - 2


def test_the_tracemalloc_option_logs_what_grew_since_the_last_signal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import tracemalloc

    from guest_agent.__main__ import trace_allocations

    before = signal.getsignal(signal.SIGUSR2)
    try:
        trace_allocations(4)
        kept = [bytearray(4096) for _ in range(256)]  # 1 MiB that stays
        with caplog.at_level("INFO", logger="ptmig.tracemalloc"):
            os.kill(os.getpid(), signal.SIGUSR2)  # handled before the next line runs
        lines = [record.getMessage() for record in caplog.records]
    finally:
        tracemalloc.stop()
        signal.signal(signal.SIGUSR2, before)
    assert len(kept) == 256
    assert lines[0].startswith("tracemalloc: +") and lines[0].endswith("kB in all")
    # the biggest growth is the list above (1 MiB and a little), told by where it was made
    assert re.match(r"tracemalloc: \+10[2-9]\d kB \+\d+: .*test_agent_main\.py", lines[1])
