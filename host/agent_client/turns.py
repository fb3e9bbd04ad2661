"""One client at a time per guest channel on a host: a flock per domain."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
import uuid

from host.agent_client.errors import AgentError

#: Where the ptmig processes of one host take turns at a guest's agent channel.
CHANNEL_TURN_DIR = "/run/ptmig/channels"
#: How long to wait for the turn: longer than any one step's agent calls.
CHANNEL_TURN_WAIT = 30.0


class ChannelTurn:
    """This process's turn at one guest's agent channel, among all ptmig processes here.

    A channel whose stream stays is taken over with VIR_DOMAIN_CHANNEL_FORCE from whoever
    holds it (host/hypervisor/qemu.py): a ``ptmig status`` would break a running
    migration's session.  So a client holds an exclusive flock on a file named by
    the domain's UUID while it is open; the kernel drops it when the holder dies.
    """

    def __init__(
        self, domain_uuid: str, directory: str = CHANNEL_TURN_DIR, wait: float = CHANNEL_TURN_WAIT
    ) -> None:
        name = str(uuid.UUID(domain_uuid))  # a UUID, never a path of the caller's choice
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._path = os.path.join(directory, name)
        self._fd: int | None = None
        deadline = time.monotonic() + wait
        while not self._take():
            if time.monotonic() >= deadline:
                raise AgentError(
                    "UNAVAILABLE",
                    f"another ptmig process on this host has "
                    f"been talking to the agent of {name} for over "
                    f"{wait:.0f} s",
                )
            time.sleep(0.1)

    def _take(self) -> bool:
        """Lock the turn's file; False while another process holds it.

        A holder unlinks the file when it is done, so the directory keeps no file per
        domain ever coordinated.  A waiter that opened the file before that may then lock
        the unlinked one: such a lock counts only if the path still names the locked file.
        """
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(self._path).st_ino == os.fstat(fd).st_ino:
                self._fd, fd = fd, -1
                return True
        except (BlockingIOError, FileNotFoundError):
            pass
        finally:
            if fd >= 0:
                os.close(fd)
        return False

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)  # while locked: nobody else holds this file
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = None
