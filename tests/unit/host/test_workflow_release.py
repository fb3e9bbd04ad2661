"""A finished migration lets go of its hosts at once, not when the cyclic GC runs: a
libvirt connection stays open while a domain handle of it lives, so a long-lived ptmigd
that kept each workflow in a reference cycle held two connections more per migration.

(A rolled-back migration still leaves cycles through its errors' tracebacks, freed by
the cyclic GC: rarer, and not yet broken.)"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from workflow_fakes import A, B, World

from host.workflow.journal import Journal
from host.workflow.model import MigrationRequest, Outcome


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def tracked(world: World) -> weakref.WeakSet[object]:
    """Every hypervisor connection the world's coordinator opens from now on."""
    opened: weakref.WeakSet[object] = weakref.WeakSet()
    connect = world.connect

    def tracking(uri: str) -> object:
        hv = connect(uri)
        opened.add(hv)
        return hv

    world.connect = tracking  # type: ignore[method-assign,assignment]
    return opened


def test_done_migrations_release_their_hosts_without_the_cyclic_gc(
    journal: Journal, no_cyclic_gc: None
) -> None:
    world = World()
    opened = tracked(world)
    coordinator = world.coordinator(journal)
    outcomes = [
        coordinator.migrate(MigrationRequest("vm1", src, dest)).outcome
        for src, dest in ((A, B), (B, A), (A, B))
    ]
    assert outcomes == [Outcome.DONE] * 3
    assert world.running_on("vm1") == [B]
    assert len(opened) == 0  # all six were opened and none is alive
