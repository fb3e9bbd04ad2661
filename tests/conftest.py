"""Shared pytest configuration: e2e tests need root and the lab's tools."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """Entry points called in-process (ptmigd's main) configure the root logger for the
    process; the next test must not inherit their handlers or level."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ptmig-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="lab e2e tests need root (network namespaces, libvirtd)")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


# Hypothesis: the same examples on every run and no example database, so a CI result
# does not depend on what an earlier run found.  HYPOTHESIS_PROFILE=dev explores anew.
settings.register_profile("ci", derandomize=True, database=None, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
