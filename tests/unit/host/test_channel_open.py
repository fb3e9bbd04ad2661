"""Opening a guest's channel (host/hypervisor/qemu.py): without FORCE while the previous
stream is being closed, FORCE only for a stream that stays.  libvirtd 11.3 deadlocks when
FORCE aborts a stream whose own abort is under way (docs/lab.md); libvirt's test driver has
no channels, so a stand-in for the virDomain answers as libvirt's QEMU driver does."""

from __future__ import annotations

import pytest

libvirt = pytest.importorskip("libvirt")

from host.hypervisor.qemu import CHANNEL_BUSY, open_channel  # noqa: E402

FORCE = libvirt.VIR_DOMAIN_CHANNEL_FORCE


class Stream:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True


class Connection:
    def __init__(self) -> None:
        self.streams: list[Stream] = []

    def newStream(self, flags: int) -> Stream:
        self.streams.append(Stream())
        return self.streams[-1]


class Domain:
    """A domain whose channel is held by a previous stream for the first *held* opens
    without FORCE; *error*: what every open without FORCE raises instead."""

    def __init__(self, held: int, error: str | None = None) -> None:
        self.held = held
        self.error = error
        self.conn = Connection()
        self.opens: list[tuple[str, int]] = []

    def connect(self) -> Connection:
        return self.conn

    def openChannel(self, name: str, stream: Stream, flags: int) -> int:
        self.opens.append((name, flags))
        if flags & FORCE:
            return 0
        if self.error is not None:
            raise libvirt.libvirtError(self.error)
        if self.held > 0:
            self.held -= 1
            raise libvirt.libvirtError(f"operation failed: {CHANNEL_BUSY} for this domain")
        return 0


def test_a_free_channel_is_opened_without_force() -> None:
    dom = Domain(held=0)
    open_channel(dom, "org.ptmig.agent.0")
    assert dom.opens == [("org.ptmig.agent.0", 0)]


def test_a_stream_being_closed_is_waited_for_not_forced_away() -> None:
    dom = Domain(held=3)
    open_channel(dom, "agent", grace=5.0)
    assert [flags for _, flags in dom.opens] == [0, 0, 0, 0]
    # the three streams that met the busy channel were freed; the last one is the channel's
    assert [s.aborted for s in dom.conn.streams] == [True, True, True, False]


def test_a_stream_that_stays_past_the_grace_is_taken_over_with_force(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dom = Domain(held=10**6)
    with caplog.at_level("INFO", logger="host.hypervisor.qemu"):
        open_channel(dom, "agent", grace=0.2)
    assert "channel agent: another stream held it for 0.2 s; taking it over" in caplog.text
    flags = [f for _, f in dom.opens]
    assert flags[-1] == FORCE and set(flags[:-1]) == {0} and len(flags) >= 2
    assert not dom.conn.streams[-1].aborted


def test_any_other_error_is_raised_at_once_without_force() -> None:
    dom = Domain(held=0, error="Requested operation is not valid: domain is not running")
    with pytest.raises(libvirt.libvirtError, match="not running"):
        open_channel(dom, "agent", grace=5.0)
    assert [f for _, f in dom.opens] == [0]
