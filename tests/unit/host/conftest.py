"""Fixtures of the workflow tests: a journal on a temp file, the in-memory two-host world."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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
