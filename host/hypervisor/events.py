"""libvirt's event loop, started once per process, and a domain's events for the length
of a block: the waits of this package (a device's removal, the post-copy switch) are
event-driven."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

import libvirt


def _silence(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised with context."""


libvirt.registerErrorHandler(_silence, None)

_loop_lock = threading.Lock()
_loop_started = False


def ensure_event_loop() -> None:
    """libvirt delivers events only to a process that runs its event loop; start it once.

    Must happen before the first connection is opened, or that connection gets no events.
    """
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


@contextmanager
def domain_events(
    dom: libvirt.virDomain, event_ids: list[int], handler: Callable[..., None]
) -> Iterator[None]:
    """*handler* gets *dom*'s events *event_ids* while the block runs (on the event loop's
    thread)."""
    if not event_ids:
        yield
        return
    conn = dom.connect()
    ids = []
    try:
        for event_id in event_ids:
            ids.append(conn.domainEventRegisterAny(dom, event_id, handler, event_id))
        yield
    finally:
        for cb_id in ids:
            with suppress(libvirt.libvirtError):
                conn.domainEventDeregisterAny(cb_id)
