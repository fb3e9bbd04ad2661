"""ChannelTurn: ptmig processes on one host take turns at a guest's agent channel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from host.agent_client import AgentClient, AgentEndpoint, AgentError, ChannelTurn, turns

DOMAIN = "4aefc0df-b3d1-4fba-9b93-7f383c048249"

HOLD_IN_A_CHILD = """
import sys, time
from host.agent_client import ChannelTurn
turn = ChannelTurn(sys.argv[1], sys.argv[2])
print("holding", flush=True)
time.sleep(60)
"""


def test_a_second_turn_waits_for_the_first_to_be_released(short_tmp: Path) -> None:
    first = ChannelTurn(DOMAIN, str(short_tmp))
    got: list[float] = []
    t0 = time.monotonic()
    waiter = threading.Thread(
        target=lambda: (
            ChannelTurn(DOMAIN, str(short_tmp), wait=5).release(),
            got.append(time.monotonic() - t0),
        )
    )
    waiter.start()
    time.sleep(0.5)  # the first holds its turn 0.5 s: the second's wait is what is measured
    assert not got, "the second turn did not wait"
    first.release()
    waiter.join(5)
    assert got and 0.5 <= got[0] < 2


def test_no_turn_within_the_wait_is_unavailable_and_holds_nothing(short_tmp: Path) -> None:
    first = ChannelTurn(DOMAIN, str(short_tmp))
    t0 = time.monotonic()
    with pytest.raises(AgentError, match="UNAVAILABLE: another ptmig process"):
        ChannelTurn(DOMAIN, str(short_tmp), wait=0.3)
    assert 0.3 <= time.monotonic() - t0 < 1.5
    first.release()
    ChannelTurn(DOMAIN, str(short_tmp), wait=0).release()  # the failed one left no lock


def test_other_domains_do_not_wait(short_tmp: Path) -> None:
    first = ChannelTurn(DOMAIN, str(short_tmp))
    ChannelTurn("0b7c5b0e-7d2c-4c58-9d0e-2f1e4fd3b6a1", str(short_tmp), wait=0).release()
    first.release()


def test_a_dead_holder_gives_its_turn_back(short_tmp: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_IN_A_CHILD, DOMAIN, str(short_tmp)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        with pytest.raises(AgentError):
            ChannelTurn(DOMAIN, str(short_tmp), wait=0.2)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    ChannelTurn(DOMAIN, str(short_tmp), wait=1).release()


def test_the_name_must_be_a_uuid(short_tmp: Path) -> None:
    with pytest.raises(ValueError):
        ChannelTurn("../../etc/passwd", str(short_tmp))
    assert list(short_tmp.iterdir()) == []


def test_closing_the_client_releases_its_turn(short_tmp: Path) -> None:
    turn = ChannelTurn(DOMAIN, str(short_tmp))
    client = AgentClient(AgentEndpoint(vsock_cid=3), turn=turn)
    client.close()
    ChannelTurn(DOMAIN, str(short_tmp), wait=0).release()


def test_a_released_turn_leaves_no_file(short_tmp: Path) -> None:
    ChannelTurn(DOMAIN, str(short_tmp)).release()
    assert list(short_tmp.iterdir()) == []


def test_a_lock_on_a_file_its_holder_unlinked_is_not_a_turn(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race the unlink opens: a waiter opens the file, the holder releases (unlinks
    it), then the waiter's flock succeeds on the unlinked file.  A third process must
    still find the turn taken."""
    holder = ChannelTurn(DOMAIN, str(short_tmp))
    real_flock = turns.fcntl.flock
    released: list[bool] = []

    def flock_after_the_holder_lets_go(fd: int, operation: int) -> None:
        if not released:
            released.append(True)
            holder.release()
        real_flock(fd, operation)

    monkeypatch.setattr(turns.fcntl, "flock", flock_after_the_holder_lets_go)
    waiter = ChannelTurn(DOMAIN, str(short_tmp), wait=5)
    monkeypatch.setattr(turns.fcntl, "flock", real_flock)
    assert released == [True]
    with pytest.raises(AgentError, match="UNAVAILABLE"):
        ChannelTurn(DOMAIN, str(short_tmp), wait=0)
    waiter.release()
    assert list(short_tmp.iterdir()) == []
