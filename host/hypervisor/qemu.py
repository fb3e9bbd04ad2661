"""What ptmig reaches inside QEMU through libvirt: a guest's virtio-serial channel as a
byte stream, and the QEMU monitor (QMP) for ``announce-self`` and the migration job's
parameters."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import libvirt
import libvirt_qemu


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


def open_channel(dom: libvirt.virDomain, name: str) -> ChannelStream:
    """A byte stream to *dom*'s virtio-serial channel *name* (see Domain.open_channel)."""
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
