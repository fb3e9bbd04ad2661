"""What ptmig reaches inside QEMU through libvirt: a guest's virtio-serial channel as a
byte stream, and the QEMU monitor (QMP) for ``announce-self`` and the migration job's
parameters."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from typing import Any

import libvirt
import libvirt_qemu

log = logging.getLogger(__name__)


class ChannelStream:
    """A libvirt stream with the socket-like calls the agent relay uses."""

    def __init__(self, stream: libvirt.virStream) -> None:
        self._stream = stream
        self._closed = False

    def recv(self, size: int) -> bytes:
        """Up to *size* bytes; b"" at the end of the stream or after close."""
        if self._closed:
            return b""
        try:
            data = self._stream.recv(size)
        except libvirt.libvirtError:
            return b""
        return data if isinstance(data, bytes) else b""

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._stream.send(bytes(view))
            except libvirt.libvirtError as exc:
                raise OSError(f"channel stream: {exc.get_error_message()}") from exc
            if sent < 0:
                raise OSError("channel stream would block")
            view = view[sent:]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(libvirt.libvirtError):
            self._stream.abort()


#: How long an open waits for the channel's previous stream to go before taking it over
#: with FORCE: a stream being closed is gone in milliseconds, even in a busy libvirtd.
CHANNEL_BUSY_GRACE_S = 0.5
#: Between two tries of an open the channel's previous stream still held.
CHANNEL_BUSY_RETRY_S = 0.05
#: What libvirt's QEMU driver says when a channel has a stream and FORCE was not given.
CHANNEL_BUSY = "Active channel stream exists"


def open_channel(
    dom: libvirt.virDomain, name: str, grace: float = CHANNEL_BUSY_GRACE_S
) -> ChannelStream:
    """A byte stream to *dom*'s virtio-serial channel *name* (see Domain.open_channel).

    Without FORCE first, and with FORCE only once the previous stream stayed for *grace*
    seconds (a crashed holder's).  FORCE makes libvirtd (``virChrdevOpen``, 11.3 and
    master) abort the previous stream while it holds the domain's chardev lock; if that
    stream's own abort is under way in libvirtd's main loop at that moment (its client
    just closed it: each agent session of ptmig opens after the last one closed), the
    two take the chardev lock and the stream's lock in opposite orders and libvirtd
    deadlocks for good (docs/lab.md, with the backtrace).  Without FORCE an open meets
    "busy" until the previous stream is gone, and nothing is aborted under the lock.
    """
    started = time.monotonic()
    deadline = started + grace
    busy = 0
    while True:
        stream = dom.connect().newStream(0)
        try:
            dom.openChannel(name, stream, 0)
            if busy:
                log.debug("channel %s: free after %.2f s", name, time.monotonic() - started)
            return ChannelStream(stream)
        except libvirt.libvirtError as exc:
            with contextlib.suppress(libvirt.libvirtError):
                stream.abort()  # never opened: only the client's end to free
            if CHANNEL_BUSY not in str(exc):  # libvirt's message, or the one given
                raise
        busy += 1
        if time.monotonic() >= deadline:
            break
        time.sleep(CHANNEL_BUSY_RETRY_S)
    log.info("channel %s: another stream held it for %.1f s; taking it over", name, grace)
    stream = dom.connect().newStream(0)
    dom.openChannel(name, stream, libvirt.VIR_DOMAIN_CHANNEL_FORCE)
    return ChannelStream(stream)


def monitor_command(
    dom: libvirt.virDomain, command: str, arguments: dict[str, Any] | None = None
) -> str:
    """QMP *command* on *dom*'s QEMU monitor; QEMU's reply as it came.  Raises libvirt's
    error."""
    request: dict[str, Any] = {"execute": command}
    if arguments is not None:
        request["arguments"] = arguments
    return str(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(request), 0))
