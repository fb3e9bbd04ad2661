"""Fuzz targets: the agent's helpers on sys.path, and a summary line per target."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit" / "guest_agent"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fuzzing import RESULTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RESULTS:
        terminalreporter.section("fuzz")
        for result in RESULTS:
            terminalreporter.write_line(result.line())
