"""Whether a workflow's owner still runs: a process named by pid, start time (``/proc/PID/stat``
field 22) and boot id, so that a recycled pid or a reboot is not taken for a live owner.
The journal's owners and the lease's holders are both named this way."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/PID/stat (after the parenthesised comm), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    _, _, rest = text.rpartition(")")
    return rest.split()


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks after boot."""
    fields = _proc_stat(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # fields[0] is field 3
    except ValueError:
        return None


def boot_id_now() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_alive(
    pid: int,
    start_time: int | None,
    boot_id: str | None,
    *,
    current_boot_id: Callable[[], str | None] = boot_id_now,
) -> bool:
    """Whether process `pid`, started at `start_time` in boot `boot_id`, still runs."""
    if pid <= 0:
        return False
    if boot_id is not None:
        now = current_boot_id()
        if now is not None and now != boot_id:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _proc_stat(pid)
    if fields is None:
        return start_time is None  # no /proc: the pid is all we can go by
    if fields and fields[0] in ("Z", "X"):
        return False
    return start_time is None or process_start_time(pid) == start_time
