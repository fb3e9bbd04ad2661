"""Shared pytest configuration: e2e tests need root and the lab's tools."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="lab e2e tests need root (network namespaces, libvirtd)")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)
