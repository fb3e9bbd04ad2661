"""Fixtures for the guest agent's unit tests (pytest puts this directory on sys.path)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_fake_links import FakeLinks
from agent_scene import build_scene


@pytest.fixture
def fake() -> Iterator[FakeLinks]:
    links = FakeLinks()
    build_scene(links)
    yield links
    links.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ptmig-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
