"""Outcomes of state-changing calls by operation id.

The host retries a call whose answer it lost (a migration resets the channel
mid-call); the retry must not act twice.  So the first call with an id runs and
its outcome -- response or error -- is recorded; a later call with the same id
gets that outcome, and one that arrives while the first still runs waits for it.
The log is bounded: the oldest finished entries are forgotten first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


class OperationIdReused(Exception):
    """The id was recorded for a different request: a caller bug, never a retry."""


@dataclass
class _Entry(Generic[T]):
    fingerprint: Hashable
    done: threading.Event = field(default_factory=threading.Event)
    value: T | None = None
    error: BaseException | None = None


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
                entry.value = action()
            except not_done as exc:
                entry.error = exc  # for a retry already waiting on this attempt
                with self._lock:
                    if self._entries.get(operation_id) is entry:
                        del self._entries[operation_id]
                raise
            except Exception as exc:
                entry.error = exc
            finally:
                entry.done.set()
        else:
            entry.done.wait()
        if entry.error is not None:
            raise entry.error
        return entry.value, not first  # type: ignore[return-value]

    def _evict(self) -> None:
        finished = [key for key, entry in self._entries.items() if entry.done.is_set()]
        for key in finished[: max(0, len(self._entries) - self._capacity)]:
            del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
