"""Wire format of the virtio-serial session handshake (docs/agent-transport.md).

Part of the contract, next to the generated gRPC code: the host's channel
(host/agent_client/relay.py) and the guest's relay (guest_agent.transports.virtio_serial)
both import it from here; it imports nothing but the standard library.

A virtio-serial port is one byte stream with no connection semantics, so each
host connection starts with a HELLO frame carrying a fresh random session id; the
guest answers ACK with the same id and only then relays HTTP/2.  Both sides
discard bytes until they see the frame they wait for, which drops whatever an
earlier session left in the port.

Frame, 32 bytes:
    0  8  magic      ff 50 54 4d 49 47 53 00   ("\\xffPTMIGS\\0")
    8  1  version    1
    9  1  type       1 HELLO (host->guest), 2 ACK, 3 REJECT (guest->host)
   10  2  reserved   0
   12 16  session    random, chosen by the host; ACK/REJECT echo it
   28  4  crc32      zlib.crc32 of bytes 0..27, big-endian
"""

from __future__ import annotations

import enum
import struct
import zlib
from typing import NamedTuple

#: The virtio-serial port the agent listens on: the domain's ``<channel>`` target name
#: and, in the guest, ``/dev/virtio-ports/<AGENT_CHANNEL>``.
AGENT_CHANNEL = "org.ptmig.agent.0"
MAGIC = b"\xffPTMIGS\x00"
VERSION = 1
SESSION_ID_SIZE = 16
_BODY = struct.Struct(">8sBBH16s")
FRAME_SIZE = _BODY.size + 4  # 32


class FrameType(enum.IntEnum):
    HELLO = 1
    ACK = 2
    REJECT = 3  # version not supported, or the agent's gRPC socket is unavailable


class Frame(NamedTuple):
    type: int
    session: bytes
    version: int = VERSION


def encode(frame_type: FrameType, session: bytes, version: int = VERSION) -> bytes:
    if len(session) != SESSION_ID_SIZE:
        raise ValueError(f"session id must be {SESSION_ID_SIZE} bytes")
    body = _BODY.pack(MAGIC, version, int(frame_type), 0, session)
    return body + struct.pack(">I", zlib.crc32(body))


def decode(data: bytes) -> Frame | None:
    """The frame at the start of `data` (FRAME_SIZE bytes), or None if it is not one."""
    if len(data) < FRAME_SIZE:
        return None
    body = data[: _BODY.size]
    magic, version, frame_type, _reserved, session = _BODY.unpack(body)
    (crc,) = struct.unpack(">I", data[_BODY.size : FRAME_SIZE])
    if magic != MAGIC or crc != zlib.crc32(body):
        return None
    return Frame(frame_type, session, version)


def find(data: bytes, frame_type: int) -> tuple[int, Frame] | None:
    """Offset and frame of the first complete, valid frame of `frame_type` in `data`."""
    start = 0
    while (pos := data.find(MAGIC, start)) >= 0:
        frame = decode(data[pos : pos + FRAME_SIZE])
        if frame is not None and frame.type == frame_type:
            return pos, frame
        if len(data) - pos < FRAME_SIZE:
            return None
        start = pos + 1
    return None


class Scanner:
    """Finds frames of one type in a stream that arrives in arbitrary chunks.

    Bytes are never held back: `scan` hands every byte before a frame straight
    out and keeps only a copy of the last FRAME_SIZE-1 bytes to catch a frame
    split across chunks.  The part of such a frame that was handed out belongs to
    the session the frame ends anyway.
    """

    def __init__(self, frame_type: int) -> None:
        self._type = frame_type
        self._tail = b""

    def scan(self, chunk: bytes) -> tuple[bytes, Frame | None, bytes]:
        """Split `chunk` into (bytes before the frame, frame, bytes after it, unscanned)."""
        window = self._tail + chunk
        found = find(window, self._type)
        if found is None:
            self._tail = window[-(FRAME_SIZE - 1) :]
            return chunk, None, b""
        pos, frame = found
        offset = len(self._tail)
        self._tail = b""
        return chunk[: max(0, pos - offset)], frame, chunk[pos + FRAME_SIZE - offset :]

    def reset(self) -> None:
        self._tail = b""
