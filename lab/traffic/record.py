"""The sender's output file: one line per request, written as it goes, read back whole."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

FORMAT_MAGIC = "#ptmig-traffic"
FORMAT_VERSION = 1
FLUSH_INTERVAL_NS = 200_000_000


class RecordWriter:
    """Appends events to the TSV file and flushes periodically, so a killed run keeps its data."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._f: IO[str] = open(path, "w", encoding="ascii", buffering=1 << 16)  # noqa: SIM115
        self._last_flush = time.monotonic_ns()

    def header(self, key: str, value: object) -> None:
        self._f.write(f"#{key}\t{value}\n")

    def sent(self, seq: int, send_ns: int, err: int | None) -> None:
        self._f.write(f"s\t{seq}\t{send_ns}\n" if err is None else f"s\t{seq}\t{send_ns}\t{err}\n")

    def received(self, seq: int, recv_ns: int) -> None:
        self._f.write(f"r\t{seq}\t{recv_ns}\n")

    def maybe_flush(self, now_ns: int) -> None:
        if now_ns - self._last_flush >= FLUSH_INTERVAL_NS:
            self.flush(now_ns)

    def flush(self, now_ns: int | None = None) -> None:
        self._f.flush()
        self._last_flush = time.monotonic_ns() if now_ns is None else now_ns

    def close(self) -> None:
        self._f.close()


@dataclass
class PingRecord:
    """One sender run: per request (index = seq) its send time and reply time or None."""

    target: str
    rate: float
    payload_size: int
    token: int
    ident: int
    start_ns: int
    send_ns: list[int]
    recv_ns: list[int | None]
    send_errors: dict[int, int] = field(default_factory=dict)  # seq -> errno of sendto
    duplicates: int = 0
    stop_ns: int | None = None
    end_ns: int | None = None

    @property
    def complete(self) -> bool:
        """False if the sender was killed before it finished listening for late replies."""
        return self.end_ns is not None

    @property
    def sent(self) -> int:
        return len(self.send_ns)


def load_record(path: str | os.PathLike[str]) -> PingRecord:
    """Read a sender output file; a torn last line (killed mid-write) is ignored."""
    headers: dict[str, str] = {}
    send: list[int] = []
    recv: list[int | None] = []
    errors: dict[int, int] = {}
    duplicates = 0
    lines = Path(path).read_text(encoding="ascii").split("\n")
    # The text after the last newline is a torn or empty line: drop it.
    for lineno, line in enumerate(lines[:-1], 1):
        parts = line.split("\t")
        try:
            if parts[0].startswith("#"):
                headers[parts[0][1:]] = parts[1]
            elif parts[0] == "s":
                seq, t = int(parts[1]), int(parts[2])
                if seq != len(send):
                    raise ValueError(f"send of seq {seq} out of order")
                send.append(t)
                recv.append(None)
                if len(parts) > 3:
                    errors[seq] = int(parts[3])
            elif parts[0] == "r":
                seq, t = int(parts[1]), int(parts[2])
                if not 0 <= seq < len(recv):
                    raise ValueError(f"reply to unsent seq {seq}")
                if recv[seq] is None:
                    recv[seq] = t
                else:
                    duplicates += 1
            else:
                raise ValueError(f"unknown record {parts[0]!r}")
        except (IndexError, ValueError) as exc:
            raise ValueError(f"{path}:{lineno}: bad line {line!r}: {exc}") from exc
    if headers.get(FORMAT_MAGIC[1:]) != str(FORMAT_VERSION):
        raise ValueError(f"{path}: not a ptmig-traffic v{FORMAT_VERSION} file")
    stop = headers.get("stop_ns")
    end = headers.get("end_ns")
    return PingRecord(
        target=headers["target"],
        rate=float(headers["rate"]),
        payload_size=int(headers["payload_size"]),
        token=int(headers["token"], 16),
        ident=int(headers["ident"]),
        start_ns=int(headers["start_ns"]),
        send_ns=send,
        recv_ns=recv,
        send_errors=errors,
        duplicates=duplicates,
        stop_ns=None if stop is None else int(stop),
        end_ns=None if end is None else int(end),
    )
