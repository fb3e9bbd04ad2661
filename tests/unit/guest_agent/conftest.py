"""Fixtures for the guest agent's unit tests (pytest puts this directory on sys.path)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from agent_fake_links import FakeLinks
from agent_scene import build_scene


@pytest.fixture
def fake() -> Iterator[FakeLinks]:
    links = FakeLinks()
    build_scene(links)
    yield links
    links.close()
