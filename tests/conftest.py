"""Shared pytest configuration: e2e tests need root and the lab's tools."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """Entry points called in-process (ptmigd's main) configure the root logger for the
    process; the next test must not inherit their handlers or level."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


class LogSeen(logging.Handler):
    """Set :attr:`seen` when `logger` emits a record whose message holds every one of
    `words`: a test's event for a point reached in a thread it cannot otherwise see (a
    server's handler), instead of a sleep or a poll of caplog."""

    def __init__(self, words: tuple[str, ...]) -> None:
        super().__init__(logging.DEBUG)
        self.words = words
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if all(word in message for word in self.words):
            self.seen.set()


@pytest.fixture
def logged() -> Iterator[Callable[..., threading.Event]]:
    """``logged("logger.name", "word", ...)``: an Event set once that logger (or one below
    it) logs a record holding every word; the logger's level is lowered to DEBUG meanwhile
    so the record is made, and restored afterwards."""
    added: list[tuple[logging.Logger, LogSeen, int]] = []

    def watch(name: str, *words: str) -> threading.Event:
        logger = logging.getLogger(name)
        handler = LogSeen(words)
        added.append((logger, handler, logger.level))
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        return handler.seen

    yield watch
    for logger, handler, level in reversed(added):
        logger.removeHandler(handler)
        logger.setLevel(level)


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
