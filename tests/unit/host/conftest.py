"""Fixtures of the host tests: a journal on a temp file, the in-memory two-host world, a
connection to libvirt's test driver."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from workflow_fakes import World

from host.workflow.journal import Journal


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "journal.sqlite"


@pytest.fixture
def journal(journal_path: Path) -> Iterator[Journal]:
    with Journal(journal_path) as j:
        yield j


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def conn() -> Iterator[Any]:
    """libvirt's test driver (``test:///default``), its state shared within the process."""
    libvirt = pytest.importorskip("libvirt")
    connection = libvirt.open("test:///default")
    yield connection
    connection.close()
