"""A ptmigd serving the in-memory world's Coordinator on a unix socket, for the tests that
call it over real gRPC."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from ptmig.v1 import coordinator_pb2_grpc as pb_grpc
from workflow_fakes import World

from host.daemon import ListenConfig, serve
from host.workflow.journal import Journal

CALL_TIMEOUT = 30


@contextmanager
def world_ptmigd(
    world: World, journal_path: Path, short_tmp: Path
) -> Iterator[tuple[Any, Journal]]:
    """(a Coordinator stub, the journal it writes); at the end every workflow has ended."""
    with Journal(journal_path) as journal:
        daemon = serve(
            world.coordinator(journal),
            ListenConfig(socket=short_tmp / "run" / "ptmigd.sock", threads=4),
        )
        try:
            with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
                yield pb_grpc.CoordinatorStub(channel), journal
        finally:
            daemon.stop(grace=1)
            assert daemon.wait_for_workflows(timeout=CALL_TIMEOUT)
