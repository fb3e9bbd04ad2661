"""Outcomes of state-changing calls by operation id.

The host retries a call whose answer it lost (a migration resets the channel
mid-call); the retry must not act twice.  So the first call with an id runs and
its outcome -- response or error -- is recorded; a later call with the same id
gets that outcome, and one that arrives while the first still runs waits for it.
The log is bounded: the oldest finished entries are forgotten first.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class OperationIdReused(Exception):
    """The id was recorded for a different request: a caller bug, never a retry."""


class _Entry(Generic[T]):
    """One operation id's outcome, filled in once `done` is set.

    A plain class rather than a dataclass, as every value class the agent imports before
    it listens: see guest_agent.links' docstring.
    """

    __slots__ = ("done", "error", "fingerprint", "value")

    def __init__(self, fingerprint: Hashable) -> None:
        self.fingerprint = fingerprint
        self.done = threading.Event()
        self.value: T | None = None
        self.error: BaseException | None = None


#: The `done` of every finished entry: its own Event (a Condition, a lock and a deque
#: of waiters) is dropped once set, so that the log's few hundred finished entries are
#: small; what an agent keeps long between calls leaves holes in the memory its calls
#: used (docs/benchmarks/agent.md, issue 24).
_FINISHED = threading.Event()
_FINISHED.set()


def _detached(error: BaseException) -> BaseException:
    """A copy of *error* to record and to raise on replays: same type, message and
    attributes, but no traceback, cause or context.

    A recorded traceback would keep every frame of the failed call alive, up the stack
    into gRPC's: its call state and, through it, the call's HTTP/2 connection and socket
    (one per migration's channel).  Measured on Debian 12's grpcio 1.51: 100 rounds of a
    new connection with two refused calls kept 200 calls' state and +8 MB, with the
    connections' fds open, until the log forgot the entries (docs/benchmarks/agent.md).
    Raising a fresh copy on each replay keeps the replay's frames off the record too.
    """
    try:
        twin = copy.copy(error)
    except Exception:  # an exception whose constructor does not take its own args
        return RuntimeError(f"{type(error).__name__}: {error}")
    twin.__traceback__ = None
    return twin


class OperationLog(Generic[T]):
    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[str, _Entry[T]] = OrderedDict()
        self._lock = threading.Lock()

    def run(
        self,
        operation_id: str,
        fingerprint: Hashable,
        action: Callable[[], T],
        not_done: tuple[type[Exception], ...] = (),
    ) -> tuple[T, bool]:
        """Return (outcome, replayed); raise the recorded error on a replayed failure.

        An error of a *not_done* type says the action did nothing: it is not recorded, so
        a retry with the same id runs the action.
        """
        with self._lock:
            entry = self._entries.get(operation_id)
            first = entry is None
            if entry is None:
                entry = self._entries[operation_id] = _Entry(fingerprint)
                self._evict()
            elif entry.fingerprint != fingerprint:
                raise OperationIdReused(
                    f"operation_id {operation_id!r} was already used for a different request"
                )
        if first:
            try:
                value = entry.value = action()
            except not_done as exc:
                entry.error = _detached(exc)  # for a retry already waiting on this attempt
                with self._lock:
                    if self._entries.get(operation_id) is entry:
                        del self._entries[operation_id]
                raise
            except Exception as exc:
                entry.error = _detached(exc)
                raise  # the first caller gets the original, with its traceback
            finally:
                done, entry.done = entry.done, _FINISHED  # a waiter holds `done` itself
                done.set()
            return value, False
        entry.done.wait()
        if entry.error is not None:
            raise _detached(entry.error)
        return entry.value, True  # type: ignore[return-value]

    def _evict(self) -> None:
        finished = [key for key, entry in self._entries.items() if entry.done.is_set()]
        for key in finished[: max(0, len(self._entries) - self._capacity)]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
