"""The virtio-serial handshake's wire format; it lives in the contract package.

Re-exported here so the guest's transports read as one package; the definition,
shared with the host, is protos/ptmig/serial_session.py (`ptmig.serial_session`).
"""

from ptmig.serial_session import (
    FRAME_SIZE,
    MAGIC,
    SESSION_ID_SIZE,
    VERSION,
    Frame,
    FrameType,
    Scanner,
    decode,
    encode,
    find,
)

__all__ = [
    "FRAME_SIZE",
    "MAGIC",
    "SESSION_ID_SIZE",
    "VERSION",
    "Frame",
    "FrameType",
    "Scanner",
    "decode",
    "encode",
    "find",
]
